"""The int8 pass: QDQ with int8 weights, numerics against ONNX Runtime's own int8 model, budgets."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgecomp
from edgecomp.errors import InputError
from edgecomp.numerics import Tolerance, compare, run_ort
from edgecomp.passes.quantize_int8 import QuantizeConfig, QuantizeInt8, parse_int8

from helpers import make_model


def conv_mlp(seed: int = 0) -> onnx.ModelProto:
    """Conv 3x3 → Relu → Flatten → Gemm → Relu → Gemm: the contractions int8 quantizes."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 2, 3, 3)) * 0.3).astype(np.float32), "cw"),
        numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "cb"),
        numpy_helper.from_array((rng.standard_normal((32, 8 * 6 * 6)) * 0.05).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal(32) * 0.1).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((10, 32)) * 0.2).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(10, np.float32), "b2"),
    ]
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "cw", "cb"], ["c"], name="conv", kernel_shape=[3, 3]),
        n("Relu", ["c"], ["r"], name="relu"),
        n("Flatten", ["r"], ["f"], name="flat"),
        n("Gemm", ["f", "w1", "b1"], ["h"], name="fc1", transB=1),
        n("Relu", ["h"], ["hr"], name="relu1"),
        n("Gemm", ["hr", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "conv_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    return make_model(graph)


def samples(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 2, 8, 8)).astype(np.float32)} for _ in range(n)]


def quantize(model: onnx.ModelProto, config: QuantizeConfig, calib) -> tuple[onnx.ModelProto, object]:
    result = QuantizeInt8(config, calib)(ir.serde.deserialize_model(model))
    return ir.serde.serialize_model(result.model), result


def ort_quantized(model: onnx.ModelProto, calib, tmp_path) -> onnx.ModelProto:
    """ONNX Runtime's own quantize_static with the same settings, called directly."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    class Reader:
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    out = tmp_path / "ort-int8.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    quantize_static(copy, str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                   "OpTypesToExcludeOutputQuantization": ["Conv", "MatMul", "Gemm"]})
    return onnx.load(str(out))


def test_weights_become_int8_behind_dequantize():
    model, calib = conv_mlp(), samples(32, 1)
    q, result = quantize(model, QuantizeConfig(), calib)
    inits = {i.name: i for i in q.graph.initializer}
    for node in q.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            producer = next(p for p in q.graph.node if node.input[1] in p.output)
            assert producer.op_type == "DequantizeLinear"
            w = inits[producer.input[0]]
            assert w.data_type == TensorProto.INT8
            scale = numpy_helper.to_array(inits[producer.input[1]])
            assert scale.shape == (w.dims[0],)  # per output channel
    assert result.stats["layers_quantized"] == 3
    assert result.stats["weight_bytes_after"] * 4 == result.stats["weight_bytes_before"]
    assert {r["decision"] for r in result.layers} == {"int8"}


def test_matches_onnxruntime_own_int8_model(tmp_path):
    """Same calibration and settings → the same int8 model as calling ORT directly."""
    model, calib, test = conv_mlp(), samples(32, 1), samples(16, 2)
    ours, _ = quantize(model, QuantizeConfig(), calib)
    theirs = ort_quantized(model, calib, tmp_path)
    got, want = run_ort(ours, test, ["y"]), run_ort(theirs, test, ["y"])
    assert compare(["y"], want, got, Tolerance(atol=0, rtol=0, min_cosine=1 - 1e-12)).ok
    # and int8 stays close to float on these inputs: cosine ≥ 0.99 per sample
    fp = run_ort(model, test, ["y"])
    cmp = compare(["y"], fp, got, Tolerance(atol=np.inf, rtol=0, min_cosine=0.99, min_top1=0.0))
    assert cmp.ok, cmp.failures
    assert cmp.outputs[0].max_abs > 0  # it really is quantized


def test_compiled_int8_bundle_matches_onnxruntime_int8(tmp_path):
    """TVM runs the QDQ graph (dequantize → fp32 compute → quantize); ORT runs int8 kernels.
    Both round at the same points, so the outputs agree to float rounding."""
    model, calib, test = conv_mlp(), samples(32, 1), samples(8, 2)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    res = edgecomp.build(path, output=tmp_path / "b", int8="minmax",
                         calib={"x": np.stack([s["x"] for s in calib])},
                         reference_inputs={"x": np.stack([s["x"] for s in test])})
    num = res.verification["numerics"]
    assert num["ok"] and num["outputs"][0]["max_abs"] <= 1e-4
    b = edgecomp.load_bundle(res.path)
    try:
        dtypes = {p["dtype"] for p in b.manifest["params"]}
        assert "int8" in dtypes  # weights are stored as int8 in the bundle
        w = b.weights()
        int8_shapes = sorted(a.shape for a in w.values() if a.dtype == np.int8 and a.ndim > 1)
        # the fully connected (Gemm transB=1) weights are stored [K, N], the conv weight HWIO (NHWC
        # code), int8 kept, and say so
        assert int8_shapes == [(3, 3, 2, 8), (32, 10), (288, 32)]
        assert sorted(tuple(p["shape"]) for p in b.manifest["params"] if p.get("layout") == "transposed") == [(32, 10), (288, 32)]
        assert [tuple(p["shape"]) for p in b.manifest["params"] if p.get("layout") == "HWIO"] == [(3, 3, 2, 8)]
        assert not any(a.dtype == np.float32 and a.ndim > 1 for a in w.values())  # no float copy
    finally:
        b.close()


def test_budget_leaves_most_sensitive_layer_in_float():
    """Layers that cannot be quantized well are left in float, most sensitive first, until the
    budget is met (one huge weight per output channel squeezes the others to zero)."""
    model = conv_mlp()
    w1 = next(i for i in model.graph.initializer if i.name == "w1")
    arr = numpy_helper.to_array(w1).copy()
    arr[:, 0] = 400.0  # every channel's scale set by a feature that is almost always 0 after Relu
    w1.CopyFrom(numpy_helper.from_array(arr, "w1"))
    calib = samples(32, 1)
    _, plain = quantize(model, QuantizeConfig(), calib)
    assert plain.stats["layers_quantized"] == 3
    q, res = quantize(model, QuantizeConfig(budget=("cosine", 0.999)), calib)
    assert res.stats["calibration_metric_all_int8"] < 0.999 <= res.stats["calibration_metric"]
    decisions = {r["name"]: r["decision"] for r in res.layers}
    sens = {r["name"]: r["sensitivity"] for r in res.layers}
    # fc1's outlier hurts fc1 itself and, through its huge output range, fc2's quantized input:
    # both measure far more sensitive than the conv, and both are left in float; the conv stays int8.
    assert min(sens["fc1"], sens["fc2"]) > 100 * sens["conv"]
    assert decisions == {"conv": "int8", "fc1": "float (most sensitive)", "fc2": "float (most sensitive)"}
    assert res.stats["kept_float_by_budget"] == sorted(["fc1", "fc2"], key=lambda n: -sens[n])
    fc1 = next(n for n in q.graph.node if n.name == "fc1")
    assert fc1.input[1] == "w1"  # still the float initializer
    conv = next(n for n in q.graph.node if n.name == "conv")
    assert conv.input[1] != "cw"  # behind a DequantizeLinear


def test_keep_float_is_respected():
    q, res = quantize(conv_mlp(), QuantizeConfig(keep_float=("fc2",)), samples(16, 1))
    assert {r["name"]: r["decision"] for r in res.layers}["fc2"].startswith("float")
    assert next(n for n in q.graph.node if n.name == "fc2").input[1] == "w2"


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile=99.9"])
def test_calibration_methods_run_and_stay_close(method):
    model, calib, test = conv_mlp(), samples(32, 1), samples(8, 2)
    q, _ = quantize(model, parse_int8(method), calib)
    cmp = compare(["y"], run_ort(model, test, ["y"]), run_ort(q, test, ["y"]),
                  Tolerance(atol=np.inf, rtol=0, min_cosine=0.97, min_top1=0.0))
    assert cmp.ok, (method, cmp.failures)


@pytest.mark.parametrize("spec", ["median", "minmax:budget:size=2", "percentile=20", "entropy:budget:top1=1.5", "minmax=3"])
def test_bad_specs(spec):
    with pytest.raises(InputError, match="--int8"):
        parse_int8(spec)


def test_needs_calibration_data():
    with pytest.raises(InputError, match="calibration"):
        QuantizeInt8(QuantizeConfig(), None)


def test_cli_digits_int8(tmp_path):
    out = tmp_path / "d"
    proc = subprocess.run(
        [sys.executable, "-m", "edgecomp", "build", "--example", "digits", "--int8", "minmax", "-o", str(out), "-q", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    int8 = next(p for p in m["passes"] if p["name"] == "int8")
    assert int8["stats"]["layers_quantized"] == 4
    assert int8["param_bytes"][1] < int8["param_bytes"][0] / 3.5
    ev = m["verification"]["evaluation"]
    assert ev["compiled_accuracy"] >= ev["ort_accuracy"] - 0.01  # ≤ 1 point lost on the test split


def test_compiled_digits_int8_close_to_onnxruntime_fused_int8_kernels(tmp_path):
    """ORT's own int8 execution (QDQ fused into int8 kernels, full optimizations) vs the compiled
    bundle on the whole test split: stated tolerance cosine ≥ 0.999 per sample, top-1 ≥ 0.99."""
    from edgecomp.numerics import ort_session

    res = edgecomp.build(example="digits", output=tmp_path / "d", int8="minmax")
    ex = res.manifest["model"]["example"]
    assert ex == "digits"
    from edgecomp.examples import get_example

    x, _ = get_example("digits").split("test")
    sess = ort_session(res.graph.SerializeToString())  # bytes: fully optimized, fused int8 kernels
    assert any(n.op_type == "QuantizeLinear" for n in res.graph.graph.node)
    fused = np.stack([sess.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
    ours = edgecomp.run_bundle(res.path, {"input": x[:, None]})["logits"]
    cmp = compare(["logits"], [[f] for f in fused], [[o] for o in ours],
                  Tolerance(atol=np.inf, rtol=0, min_cosine=0.999, min_top1=0.99))
    assert cmp.ok, cmp.failures


def test_weight_only_int8_needs_no_calibration_and_keeps_activations_float():
    model, test = conv_mlp(), samples(8, 2)
    q, res = quantize(model, QuantizeConfig(activations="none"), None)
    ops = [n.op_type for n in q.graph.node]
    assert "QuantizeLinear" not in ops and ops.count("DequantizeLinear") == 3
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    assert not any(v.dtype == np.float32 and v.ndim > 1 for v in inits.values())  # no float weight left
    # per output channel: Conv [8,2,3,3] axis 0, Gemm transB=1 [32,288] axis 0
    assert inits["cw_int8_scale"].shape == (8,) and inits["w1_int8_scale"].shape == (32,)
    # each weight is within half a step of its channel's scale, and the extreme hits ±127
    cw = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "cw"))
    deq = inits["cw_int8"].astype(np.float32) * inits["cw_int8_scale"][:, None, None, None]
    assert np.all(np.abs(deq - cw) <= inits["cw_int8_scale"][:, None, None, None] / 2 + 1e-7)
    assert np.all(np.abs(inits["cw_int8"]).reshape(8, -1).max(axis=1) == 127)
    cmp = compare(["y"], run_ort(model, test, ["y"]), run_ort(q, test, ["y"]),
                  Tolerance(atol=np.inf, rtol=0, min_cosine=0.999, min_top1=0.0))
    assert cmp.ok, cmp.failures
    assert res.stats["weight_bytes_after"] * 4 == res.stats["weight_bytes_before"]


def test_weight_only_embedding_table_has_one_scale():
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((50, 16)) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"], name="embed", axis=0)], "emb",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 7, 16])],
        [numpy_helper.from_array(table, "table")],
    )
    model = make_model(graph)
    q, res = quantize(model, QuantizeConfig(activations="none", op_types=("Gather",)), None)
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    assert inits["table_int8"].dtype == np.int8 and inits["table_int8_scale"].shape == ()
    feed = [{"ids": rng.integers(0, 50, (1, 7)).astype(np.int64)}]
    got, want = run_ort(q, feed, ["y"])[0][0], table[feed[0]["ids"]]
    assert np.max(np.abs(got - want)) <= inits["table_int8_scale"] / 2 + 1e-7


def test_build_with_int8_arithmetic_matches_the_dequantize_path(tmp_path):
    plain = edgecomp.build(example="digits", output=tmp_path / "plain", int8="minmax")
    arith = edgecomp.build(example="digits", output=tmp_path / "arith", int8="minmax", int8_arith=True)
    assert arith.manifest["runtime"]["int8_arith"] is True and plain.manifest["runtime"]["int8_arith"] is False
    assert arith.verification["numerics"]["ok"]
    a, p = edgecomp.run_bundle(arith.path)["logits"], edgecomp.run_bundle(plain.path)["logits"]
    # integer accumulation is exact; only the fp32 rescale order differs
    assert np.max(np.abs(a - p)) <= 1e-4 * np.max(np.abs(p))
    assert arith.verification["evaluation"]["compiled_accuracy"] == plain.verification["evaluation"]["compiled_accuracy"]


def test_int8_arith_without_int8_is_refused(tmp_path):
    with pytest.raises(InputError, match="needs --int8"):
        edgecomp.build(example="digits", output=tmp_path / "x", int8_arith=True)


def test_nothing_to_quantize_and_unknown_ops(tmp_path):
    model = conv_mlp()
    q, res = quantize(model, QuantizeConfig(op_types=("MatMul",)), samples(8, 1))  # the model has none
    assert res.stats["layers_quantized"] == 0 and not res.modified
    assert [n.op_type for n in q.graph.node] == [n.op_type for n in model.graph.node]
    with pytest.raises(InputError, match="'Foo' is not an ONNX op"):
        QuantizeInt8(QuantizeConfig(op_types=("Foo",)), samples(8, 1))


# -- data-aware weight rounding (--int8-weights gptq) --------------------------------------------


def correlated(n: int, seed: int, shape=(1, 2, 8, 8)) -> list[dict[str, np.ndarray]]:
    """Inputs with correlated features (a smoothed, channel-mixed field), as real activations
    are: where H = XᵀX is far from diagonal, GPTQ's error compensation has something to use."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        z = rng.standard_normal(shape).astype(np.float32)
        z = z + np.roll(z, 1, axis=-1) + np.roll(z, 1, axis=-2)  # neighbouring pixels correlate
        z[:, 1] = 0.7 * z[:, 0] + 0.3 * z[:, 1]  # and the channels
        out.append({"x": z.astype(np.float32)})
    return out


def layer_error(model, quantized, layer_output: str, feeds) -> float:
    """‖Y − Ŷ‖ / ‖Y‖ of one layer's output, both graphs run by ORT."""
    def outputs(m):
        probe = onnx.ModelProto()
        probe.CopyFrom(m)
        probe.graph.output.append(helper.make_tensor_value_info(layer_output, TensorProto.FLOAT, None))
        return np.concatenate([o[0].ravel() for o in run_ort(probe, feeds, [layer_output])])
    y, q = outputs(model), outputs(quantized)
    return float(np.linalg.norm(y - q) / np.linalg.norm(y))


@pytest.mark.parametrize("layer,output", [("conv", "c"), ("fc1", "h"), ("fc2", "y")])
@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_lowers_layer_output_error(layer, output, bits):
    """Only ``layer`` quantized (the others kept float): GPTQ's output error of that layer is below
    round-to-nearest's on the calibration inputs it minimises, and on held-out inputs."""
    from edgecomp.passes.quantize_int8 import parse_int8_weights

    model, calib, held = conv_mlp(), correlated(64, 1), correlated(16, 2)
    keep = tuple(n for n in ("conv", "fc1", "fc2") if n != layer)
    errors = {}
    for rounding in ("rtn", "gptq"):
        cfg = QuantizeConfig(activations="none", keep_float=keep, **parse_int8_weights(f"{rounding}:bits={bits}"))
        q, res = quantize(model, cfg, calib)
        assert res.stats["weights"] == rounding
        w = next(numpy_helper.to_array(i) for i in q.graph.initializer if i.data_type == TensorProto.INT8 and i.dims)
        assert np.abs(w).max() <= 2 ** (bits - 1) - 1  # on the narrowed grid
        errors[rounding] = (layer_error(model, q, output, calib), layer_error(model, q, output, held))
    assert errors["gptq"][0] < errors["rtn"][0], errors
    assert errors["gptq"][1] < errors["rtn"][1] * 1.05, errors


def matmul_gemm() -> onnx.ModelProto:
    """MatMul with W [K, N] (channels on axis 1) → Gemm with transB=0: the other weight layouts."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 12)) * 0.3).astype(np.float32), "wm"),
             numpy_helper.from_array((rng.standard_normal((12, 6)) * 0.3).astype(np.float32), "wg")]
    nodes = [helper.make_node("MatMul", ["x", "wm"], ["m"], name="mm"),
             helper.make_node("Gemm", ["m", "wg"], ["y"], name="gemm")]
    graph = helper.make_graph(nodes, "mg", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6])], inits)
    return make_model(graph)


@pytest.mark.parametrize("layer,output", [("mm", "m"), ("gemm", "y")])
def test_gptq_matmul_and_gemm_layouts(layer, output):
    model = matmul_gemm()
    calib, held = correlated(48, 4, (4, 16)), correlated(8, 5, (4, 16))
    keep = ("gemm",) if layer == "mm" else ("mm",)
    errors = {}
    for rounding in ("rtn", "gptq"):
        q, _ = quantize(model, QuantizeConfig(activations="none", keep_float=keep, weights=rounding, weight_bits=4), calib)
        errors[rounding] = (layer_error(model, q, output, calib), layer_error(model, q, output, held))
    assert errors["gptq"][0] < errors["rtn"][0], errors


def test_gptq_static_keeps_ort_scales():
    """With int8 activations, GPTQ re-rounds the weights ORT's quantize_static wrote, on ORT's own
    scales: the same graph and scales, other int8 values, outputs still close to float."""
    model, calib, test = conv_mlp(), correlated(32, 1), correlated(8, 2)
    rtn, _ = quantize(model, QuantizeConfig(), calib)
    gptq, res = quantize(model, QuantizeConfig(weights="gptq"), calib)
    a = {i.name: numpy_helper.to_array(i) for i in rtn.graph.initializer}
    b = {i.name: numpy_helper.to_array(i) for i in gptq.graph.initializer}
    assert a.keys() == b.keys() and [n.op_type for n in rtn.graph.node] == [n.op_type for n in gptq.graph.node]
    assert all(np.array_equal(a[k], b[k]) for k in a if k.endswith("_scale"))
    assert any(not np.array_equal(a[k], b[k]) for k in a if k.endswith("_quantized") and a[k].dtype == np.int8)
    cmp = compare(["y"], run_ort(model, test, ["y"]), run_ort(gptq, test, ["y"]),
                  Tolerance(atol=np.inf, rtol=0, min_cosine=0.97, min_top1=0.0))
    assert cmp.ok, cmp.failures


@pytest.mark.parametrize("spec", ["obq", "gptq:bits=9", "gptq:bits=1", "rtn:bits", "gptq:@fc1", "gptq:size=4", "gptq:@=4"])
def test_bad_weight_rounding_specs(spec):
    from edgecomp.passes.quantize_int8 import parse_int8_weights

    with pytest.raises(InputError, match="--int8-weights"):
        parse_int8_weights(spec)


def test_gptq_needs_calibration_and_narrow_grids_need_weight_only():
    with pytest.raises(InputError, match="calibration"):
        QuantizeInt8(QuantizeConfig(activations="none", weights="gptq"), None)
    with pytest.raises(InputError, match="weight-only"):
        QuantizeInt8(QuantizeConfig(weight_bits=6), samples(4, 1))
    with pytest.raises(InputError, match="@nope"):
        quantize(conv_mlp(), QuantizeConfig(activations="none", layer_bits=(("nope", 6),)), samples(4, 1))


@pytest.mark.parametrize("value", ["gptq:bits=12", "adaround"])
def test_cli_bad_int8_weights_is_one_line(tmp_path, value):
    from helpers import assert_bad_input

    out = tmp_path / "d"
    proc = subprocess.run(
        [sys.executable, "-m", "edgecomp", "build", "--example", "digits", "--int8", "minmax",
         "--int8-weights", value, "-o", str(out), "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert_bad_input(proc.returncode, proc.stderr, mentions=["--int8-weights"], output=out)
