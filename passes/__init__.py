"""Graph passes, by name. Each is an ``onnx_ir`` pass in a file of its own.

``PASSES`` maps the names users give to ``--passes`` onto pass factories; ``DEFAULT_PASSES`` is
the pipeline ``edgecomp build`` runs when none is given.
"""

from __future__ import annotations

from typing import Callable

import onnx_ir as ir

from edgecomp.errors import InputError
from edgecomp.passes.base import StatsResult, count_nodes, count_params
from edgecomp.passes.dead_code import RemoveDeadCode
from edgecomp.passes.fold_constants import FoldConstants
from edgecomp.passes.shape_inference import InferShapes

__all__ = ["PASSES", "DEFAULT_PASSES", "make_passes", "StatsResult", "count_nodes", "count_params"]

PASSES: dict[str, Callable[[], ir.passes.PassBase]] = {
    "shape": InferShapes,
    "fold": FoldConstants,
    "dce": RemoveDeadCode,
}

DEFAULT_PASSES = ("shape", "fold", "dce", "shape")


def make_passes(names: str | list[str] | tuple[str, ...] | None) -> list[tuple[str, ir.passes.PassBase]]:
    """``"fold,dce"`` / ``["fold", "dce"]`` / ``None`` (default) / ``"none"`` → named pass objects."""
    if names is None:
        names = DEFAULT_PASSES
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if list(names) == ["none"]:
        return []
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise InputError(f"unknown pass {unknown[0]!r} (known passes: {', '.join(PASSES)}, or 'none')")
    return [(n, PASSES[n]()) for n in names]
