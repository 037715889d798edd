"""What every edgecomp pass returns besides the model: a stats record.

Passes are ``onnx_ir`` passes (``InPlacePass``/``FunctionalPass``). They return
:class:`StatsResult`, a ``PassResult`` with a ``stats`` dict (pass-wide numbers) and ``layers``
(one record per layer touched: shape, rank, params, FLOPs, error ...). The pipeline adds the
generic numbers (nodes, parameters, time, numerics vs ONNX Runtime) itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir

__all__ = ["StatsResult", "count_nodes", "count_params"]


@dataclasses.dataclass
class StatsResult(ir.passes.PassResult):
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def count_nodes(model: ir.Model) -> int:
    """Nodes of the main graph and of every subgraph."""
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def count_params(model: ir.Model) -> tuple[int, int]:
    """(elements, bytes) of the main graph's initializers."""
    elems = nbytes = 0
    for value in model.graph.initializers.values():
        if value.const_value is None:
            continue
        elems += value.const_value.size
        nbytes += value.const_value.nbytes
    return elems, nbytes
