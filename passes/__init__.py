"""Graph passes, by name. Each is an ``onnx_ir`` pass in a file of its own.

``PASSES`` maps the names users give to ``--passes`` onto factories taking a
:class:`PassContext` (the settings and calibration data a pass may need); ``DEFAULT_PASSES`` is the
cleanup pipeline ``edgecomp build`` runs when none is given, and compression passes are inserted
before its last shape inference when their options are given.

A pass whose class sets ``lossy = True`` changes the outputs on purpose: the pipeline holds it to
the accuracy budget against the original model instead of to exactness.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import onnx_ir as ir

from edgecomp.errors import InputError
from edgecomp.numerics import Samples
from edgecomp.passes import lowrank_conv, lowrank_embedding, lowrank_gemm, tensor_train  # noqa: F401 (register)
from edgecomp.passes.base import StatsResult, count_nodes, count_params
from edgecomp.passes.dead_code import RemoveDeadCode
from edgecomp.passes.fold_constants import FoldConstants
from edgecomp.passes.lowrank import LowRank, LowRankConfig
from edgecomp.passes.prune import Prune, PruneConfig
from edgecomp.passes.quantize_int8 import QuantizeConfig, QuantizeInt8
from edgecomp.passes.shape_inference import InferShapes

__all__ = [
    "PASSES",
    "DEFAULT_PASSES",
    "PassContext",
    "make_passes",
    "default_pass_names",
    "is_lossy",
    "StatsResult",
    "count_nodes",
    "count_params",
]


@dataclasses.dataclass
class PassContext:
    """What passes may need besides the model: their settings and calibration samples."""

    lowrank: LowRankConfig | None = None
    int8: QuantizeConfig | None = None
    prune: PruneConfig | None = None
    calib: Samples | None = None


def _lowrank(ctx: PassContext) -> LowRank:
    if ctx.lowrank is None:
        raise InputError("pass 'lowrank' needs a rank policy: --lowrank erank:1.0 (or energy:0.95, budget:params=2x, ...)")
    return LowRank(ctx.lowrank, ctx.calib)


def _prune(ctx: PassContext) -> Prune:
    if ctx.prune is None:
        raise InputError("pass 'prune' needs a spec: --prune magnitude:0.5 (or nm:2:4, channel:0.25, ...)")
    return Prune(ctx.prune, ctx.calib)


def _int8(ctx: PassContext) -> QuantizeInt8:
    return QuantizeInt8(ctx.int8 or QuantizeConfig(), ctx.calib)


PASSES: dict[str, Callable[[PassContext], ir.passes.PassBase]] = {
    "shape": lambda ctx: InferShapes(),
    "fold": lambda ctx: FoldConstants(),
    "dce": lambda ctx: RemoveDeadCode(),
    "lowrank": _lowrank,
    "int8": _int8,
    "prune": _prune,
}

DEFAULT_PASSES = ("shape", "fold", "dce", "shape")

# The order compression passes run in when given as options (not as --passes): structure first,
# quantization last, since it calibrates on the final float graph. Between low rank and pruning
# the measurements do not pick a clear winner (bench/results/compress-*.md, digits-cnn: with
# magnitude:0.5, lowrank→prune 11.5 KB vs prune→lowrank 15.2 KB at equal accuracy; with a
# sensitivity budget, 13.1 KB vs 12.6 KB), so factorizing first, which keeps the pruned zeros
# intact for the entropy coder, is the default; --passes reorders them.
COMPRESSION_ORDER = ("lowrank", "prune", "int8")


def default_pass_names(ctx: PassContext) -> list[str]:
    """The cleanup pipeline, with each configured compression pass before the last ``shape``."""
    names = list(DEFAULT_PASSES)
    for name in COMPRESSION_ORDER:
        if getattr(ctx, name, None) is not None:
            names.insert(len(names) - 1, name)
    return names


def is_lossy(p: ir.passes.PassBase) -> bool:
    return bool(getattr(p, "lossy", False))


def make_passes(
    names: str | list[str] | tuple[str, ...] | None, ctx: PassContext | None = None
) -> list[tuple[str, ir.passes.PassBase]]:
    """``"fold,dce"`` / ``["fold", "dce"]`` / ``None`` (default) / ``"none"`` → named pass objects."""
    ctx = ctx or PassContext()
    if names is None:
        names = default_pass_names(ctx)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if list(names) == ["none"]:
        return []
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise InputError(f"unknown pass {unknown[0]!r} (known passes: {', '.join(PASSES)}, or 'none')")
    return [(n, PASSES[n](ctx)) for n in names]
