"""The pass pipeline: cleanup passes change what they claim, and drift past tolerance stops a build."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecomp.errors import NumericsError
from edgecomp.numerics import Tolerance, run_ort
from edgecomp.passes import StatsResult, make_passes
from edgecomp.pipeline import run_pipeline
from edgecomp.reference import random_samples
from edgecomp.importer import graph_inputs


def _exporter_style_model() -> onnx.ModelProto:
    """x [2, 3, 4] → Reshape to a shape computed from constants (as exporters write it) → MatMul,
    plus a dead branch and a weight transposed at run time."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((3, 12)).astype(np.float32), "w_t")  # stored transposed
    two = numpy_helper.from_array(np.array([2], np.int64), "two")
    minus = numpy_helper.from_array(np.array([-1], np.int64), "minus_one")
    n = helper.make_node
    nodes = [
        n("Concat", ["two", "minus_one"], ["shape2"], name="make_shape", axis=0),
        n("Mul", ["shape2", "two"], ["shape4"], name="dead_mul"),  # feeds nothing: dead code
        n("Transpose", ["w_t"], ["w"], name="transpose_w", perm=[1, 0]),
        n("Reshape", ["x", "shape2"], ["x2"], name="reshape"),
        n("Reshape", ["x2", "shape2"], ["x3"], name="reshape_again"),
        n("MatMul", ["x3", "w"], ["y"], name="matmul"),
    ]
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w, two, minus],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, passes, tol=Tolerance()):
    samples = random_samples(graph_inputs(model), count=3)
    ref = run_ort(model, samples, ["y"])
    final, records, _ = run_pipeline(model, make_passes(passes) if isinstance(passes, str) else passes, samples, ref, ["y"], tol)
    return final, records


def test_cleanup_folds_constants_and_removes_dead_code():
    model = _exporter_style_model()
    final, records = _run(model, "shape,fold,dce,shape")
    ops = [node.op_type for node in final.graph.node]
    assert "Transpose" not in ops and "Concat" not in ops and "Mul" not in ops
    assert ops.count("MatMul") == 1
    fold = records[1]
    assert fold.name == "fold" and fold.modified and fold.nodes[0] > fold.nodes[1]
    assert all(r.numerics["ok"] for r in records)
    assert all(r.numerics["outputs"][0]["max_abs"] <= 1e-6 for r in records)
    # Shape inference filled in the output shape the model left blank.
    dims = [d.dim_value for d in final.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [2, 3]


class _Perturb(ir.passes.InPlacePass):
    """A deliberately wrong pass: scales every float initializer by 1.01."""

    def call(self, model):
        for v in model.graph.initializers.values():
            arr = v.const_value.numpy()
            if arr.dtype == np.float32:
                v.const_value = ir.Tensor(arr * 1.01, name=v.name)
        return StatsResult(model, True, stats={"scaled": 1.01})


def test_drift_past_tolerance_names_the_pass():
    with pytest.raises(NumericsError, match="pass 'perturb' changed the outputs past the tolerance: y: max abs error"):
        _run(_exporter_style_model(), [("perturb", _Perturb())])


def test_drift_within_a_loose_tolerance_is_recorded():
    _, records = _run(_exporter_style_model(), [("perturb", _Perturb())], Tolerance(atol=1.0, min_cosine=0.99))
    (rec,) = records
    assert rec.stats == {"scaled": 1.01} and rec.numerics["ok"]
    assert 1e-4 < rec.numerics["outputs"][0]["max_abs"] < 1.0


def test_unknown_pass_is_an_input_error():
    from edgecomp.errors import InputError

    with pytest.raises(InputError, match="unknown pass .bogus."):
        make_passes("fold,bogus")
    assert make_passes("none") == []
