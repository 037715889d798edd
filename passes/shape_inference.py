"""Shape inference: record static shapes and dtypes of every value (ONNX's own inference)."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (submodule is not imported by onnx_ir)

from edgecomp.passes.base import StatsResult

__all__ = ["InferShapes"]


def _unknown(model: ir.Model) -> int:
    """Values produced by nodes whose shape is not fully static."""
    count = 0
    for node in model.graph:
        for v in node.outputs:
            if v.shape is None or not all(isinstance(d, int) for d in v.shape):
                count += 1
    return count


class InferShapes(ir.passes.InPlacePass):
    """Run ONNX shape inference and keep its results on the IR (counts what stays unknown)."""

    def call(self, model: ir.Model) -> StatsResult:
        result = ir.passes.common.ShapeInferencePass(data_prop=True)(model)
        return StatsResult(model, result.modified, stats={"values_without_static_shape": _unknown(model)})
