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

__all__ = ["StatsResult", "count_nodes", "count_params", "find_node", "taken_names", "unique_name"]


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


def find_node(model: ir.Model, name: str) -> ir.Node:
    """The main-graph node called ``name`` (rewrites find their node again in whatever copy of
    the model they are given, instead of holding references across models)."""
    for node in model.graph:
        if node.name == name:
            return node
    raise KeyError(f"no node named {name!r} in the model")


def taken_names(graph: ir.Graph) -> set[str]:
    """Every node and value name in the graph and its subgraphs, to keep new names unique."""
    taken = {v.name for v in graph.inputs if v.name} | set(graph.initializers)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.name:
            taken.add(node.name)
        taken.update(v.name for v in node.outputs if v.name)
    return taken


def unique_name(base: str, taken: set[str]) -> str:
    """``base`` or ``base_1``, ``base_2``... whichever is free; the result is added to ``taken``."""
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name
