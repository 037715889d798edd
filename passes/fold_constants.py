"""Constant folding: evaluate every node whose inputs are all constants.

Exporters leave shape arithmetic (Shape → Gather → Concat → Reshape), casts of constants and
transposed weights in the graph; TVM's importer needs most of it gone. The folding itself is
onnxscript's ``FoldConstantsPass`` (an ``onnx_ir`` pass, kept by the ONNX exporter team); this
wrapper sets limits suited to weights and counts what it removed.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (submodule is not imported by onnx_ir)
from onnxscript.optimizer import _constant_folding

from edgecomp.passes.base import StatsResult, count_nodes

__all__ = ["FoldConstants"]


class FoldConstants(ir.passes.InPlacePass):
    """Fold constant subgraphs into initializers (with ONNX shape inference while folding).

    Args:
        max_elements: largest tensor (in elements) folding may read or create; 4M elements
            (16 MB of float32) lets it transpose/reshape real weight matrices.
    """

    def __init__(self, max_elements: int = 1 << 22) -> None:
        super().__init__()
        self.max_elements = max_elements

    def call(self, model: ir.Model) -> StatsResult:
        before = count_nodes(model)
        result = _constant_folding.FoldConstantsPass(
            shape_inference=True,
            input_size_limit=self.max_elements,
            output_size_limit=self.max_elements,
        )(model)
        # Folded values become Constant nodes/initializers; drop what no longer feeds anything.
        ir.passes.common.RemoveUnusedNodesPass()(model)
        ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        after = count_nodes(model)
        return StatsResult(model, result.modified or after != before, stats={"nodes_removed": before - after})
