"""Dead-code elimination: nodes, initializers, functions and opset imports nothing uses."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (submodule is not imported by onnx_ir)

from edgecomp.passes.base import StatsResult, count_nodes

__all__ = ["RemoveDeadCode"]


class RemoveDeadCode(ir.passes.InPlacePass):
    """Remove everything that does not contribute to a graph output (onnx_ir's passes)."""

    def call(self, model: ir.Model) -> StatsResult:
        nodes = count_nodes(model)
        inits = len(model.graph.initializers)
        modified = False
        for p in (
            ir.passes.common.RemoveUnusedNodesPass(),
            ir.passes.common.RemoveUnusedFunctionsPass(),
            ir.passes.common.RemoveUnusedOpsetsPass(),
        ):
            modified |= p(model).modified
        stats = {
            "nodes_removed": nodes - count_nodes(model),
            "initializers_removed": inits - len(model.graph.initializers),
        }
        return StatsResult(model, modified, stats=stats)
