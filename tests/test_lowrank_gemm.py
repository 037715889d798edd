"""Low-rank factorization of MatMul/Gemm with a constant weight (passes/lowrank_gemm.py).

Tiny graphs through the LowRank driver, the rewritten model checked by ONNX Runtime against the
original (and once through TVM). Output errors are relative Frobenius norms over all samples.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgecomp.passes.lowrank_gemm as lowrank_gemm
from edgecomp.numerics import run_ort
from edgecomp.passes.base import count_params
from edgecomp.passes.lowrank import LowRank, LowRankConfig
from edgecomp.passes.rank_selection import parse_policy

K = N = 64


# -- tiny models and data --------------------------------------------------------------------------
def _proto(nodes, inits, x_shape, y_shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def matmul_model(k=K, n=N, x_shape=("batch", K), seed=0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)) / np.sqrt(k)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")
    return _proto([node], {"W": w}, x_shape, [*x_shape[:-1], n])


def gemm_model(k=K, n=48, alpha=0.5, beta=2.0, seed=0) -> onnx.ModelProto:
    """Gemm(x, W, C) with transB=1 (W stored [n, k]), alpha, beta and a bias."""
    rng = np.random.default_rng(seed)
    inits = {"W": rng.standard_normal((n, k)) / np.sqrt(k), "C": rng.standard_normal(n)}
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="fc", transB=1, alpha=alpha, beta=beta)
    return _proto([node], inits, ("batch", k), ("batch", n))


def mlp_model(seed=0) -> onnx.ModelProto:
    """x → Gemm(transB, alpha, beta, bias) → Relu → MatMul → y."""
    rng = np.random.default_rng(seed)
    inits = {
        "W1": rng.standard_normal((N, K)) / np.sqrt(K),
        "C1": 0.1 * rng.standard_normal(N),
        "W2": rng.standard_normal((N, 32)) / np.sqrt(N),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "C1"], ["h"], name="fc1", transB=1, alpha=0.7, beta=1.5),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("MatMul", ["hr", "W2"], ["y"], name="fc2"),
    ]
    return _proto(nodes, inits, ("batch", K), ("batch", 32))


class Anisotropic:
    """Inputs whose covariance has std from 1 down to 0.01 along a random orthonormal basis."""

    def __init__(self, k=K, seed=1):
        self.rng = np.random.default_rng(seed)
        self.q, _ = np.linalg.qr(self.rng.standard_normal((k, k)))
        self.scales = np.logspace(0, -2, k)

    def draw(self, rows: int, lead=()) -> np.ndarray:
        x = (self.rng.standard_normal((rows, len(self.scales))) * self.scales) @ self.q.T
        return x.reshape(*lead, -1).astype(np.float32) if lead else x.astype(np.float32)

    def samples(self, count: int, rows: int = 16) -> list[dict[str, np.ndarray]]:
        return [{"x": self.draw(rows)} for _ in range(count)]


def run_lowrank(proto, policy, calib=None, **config):
    config.setdefault("layers", ("gemm",))
    result = LowRank(LowRankConfig(policy=parse_policy(policy), **config), calib=calib)(ir.serde.deserialize_model(proto))
    return result, ir.serde.serialize_model(result.model)


def rel_error(ref, got) -> float:
    num = sum(float(np.sum((np.float64(r[0]) - g[0]) ** 2)) for r, g in zip(ref, got))
    den = sum(float(np.sum(np.float64(r[0]) ** 2)) for r in ref)
    return float(np.sqrt(num / den))


def initializer(proto, name) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name))


def ops(proto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


def init_sizes(proto) -> dict[str, int]:
    return {t.name: int(np.prod(t.dims)) for t in proto.graph.initializer}


# -- structure and stats ---------------------------------------------------------------------------
def test_matmul_becomes_two_matmuls_and_stats_match_the_model():
    proto = matmul_model()
    data = Anisotropic()
    result, out = run_lowrank(proto, "rank:8", calib=data.samples(8))
    assert ops(out) == ["MatMul", "MatMul"]
    first, second = out.graph.node
    assert first.input[0] == "x" and second.input[0] == first.output[0]
    assert second.output == ["y"] and second.name == "fc"  # consumers and graph outputs unaffected
    assert [o.name for o in out.graph.output] == ["y"]
    sizes = init_sizes(out)
    assert "W" not in sizes  # the dense weight is gone
    assert sorted(sizes.values()) == [8 * N, K * 8]

    (rec,) = result.layers
    for key in ("name", "op", "method", "weight_shape", "rank", "erank", "params", "macs", "error", "decision"):
        assert key in rec, key
    assert rec["name"] == "fc" and rec["op"] == "MatMul" and rec["method"] == "whitened-svd"
    assert rec["decision"] == "factorized" and rec["rank"] == 8 and rec["full_rank"] == K
    assert rec["params"] == [K * N, sum(sizes.values())]
    assert rec["macs"] == [K * N, 8 * (K + N)]  # dynamic batch counts one row
    assert 1 <= rec["erank"] <= K and 0 < rec["error"] < 1
    assert result.modified and result.stats["layers_factorized"] == 1 and result.stats["data_aware"]
    assert result.stats["layer_params_after"] == count_params(result.model)[0]
    onnx.checker.check_model(out, full_check=True)


def test_gemm_transb_alpha_beta_bias_becomes_matmul_and_gemm():
    proto = gemm_model(alpha=0.5, beta=2.0)
    calib = Anisotropic().samples(8)
    result, out = run_lowrank(proto, "rank:8", calib=calib, data_aware=False)
    assert ops(out) == ["MatMul", "Gemm"]
    gemm = out.graph.node[1]
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs.get("alpha", 1.0) == 1.0 and attrs.get("transB", 0) == 0 and attrs["beta"] == pytest.approx(2.0)
    assert gemm.input[2] == "C" and gemm.output == ["y"]
    sizes = init_sizes(out)
    assert set(sizes) == {"C", "fc.lr_a", "fc.lr_b"}
    (rec,) = result.layers
    assert rec["op"] == "Gemm" and rec["method"] == "svd" and rec["weight_shape"] == [48, K]
    assert rec["params"] == [48 * K + 48, sum(sizes.values())]
    assert count_params(result.model)[0] == rec["params"][1]

    # The rewritten graph computes exactly (x·A)·B + beta·C with the factors it holds.
    a, b, c = (initializer(out, name) for name in ("fc.lr_a", "fc.lr_b", "C"))
    got = run_ort(out, calib)
    for feed, (y,) in zip(calib, got):
        np.testing.assert_allclose(y, (feed["x"] @ a) @ b + 2.0 * c, rtol=1e-4, atol=1e-4)
    # ... and approximates the original: W_eff = alpha·Wᵀ, error as recorded in weight space.
    w = numpy_helper.to_array(proto.graph.initializer[0])
    assert np.linalg.norm(a @ b - 0.5 * w.T) / np.linalg.norm(0.5 * w.T) == pytest.approx(rec["error"], rel=1e-3)


def test_skips_transa_non_constant_overridable_and_shared_weights():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((K, K)).astype(np.float32), "W")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [K, K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [K, K])
    w_in = helper.make_tensor_value_info("W", TensorProto.FLOAT, [K, K])
    cases = [
        helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["y"], name="g", transA=1)], "g", [x], [y], [w]),
        helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="m")], "g", [x, w_in], [y]),
        helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="m")], "g", [x, w_in], [y], [w]),
        helper.make_graph(  # a tied weight: factorizing one user would keep W and add params
            [
                helper.make_node("MatMul", ["x", "W"], ["h"], name="m1"),
                helper.make_node("MatMul", ["h", "W"], ["y"], name="m2"),
            ],
            "g", [x], [y], [w],
        ),
    ]
    for graph in cases:
        model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
        assert lowrank_gemm.find_gemm_layers(model, None) == []


# -- numerics --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["matmul", "gemm"])
@pytest.mark.parametrize("whiten", [False, True])
def test_full_rank_reproduces_the_original(kind, whiten):
    proto = matmul_model(k=64, n=40) if kind == "matmul" else gemm_model(k=64, n=40)
    data = Anisotropic()
    model = ir.serde.deserialize_model(proto)
    (layer,) = lowrank_gemm.find_gemm_layers(model, None)
    assert layer.full_rank == 40
    if whiten:
        x = data.draw(512).astype(np.float64)
        layer.set_input_moment(x.T @ x / len(x))
    assert layer.method == ("whitened-svd" if whiten else "svd")
    layer.apply(model, layer.full_rank)
    out = ir.serde.serialize_model(model)
    assert len(out.graph.node) == 2
    held = data.samples(4)
    ref, got = run_ort(proto, held), run_ort(out, held)
    assert rel_error(ref, got) < 1e-4
    for (r,), (g,) in zip(ref, got):
        assert np.max(np.abs(r - g)) <= 1e-4 * np.max(np.abs(r))


@pytest.mark.parametrize("data_aware", [False, True])
def test_error_grows_as_rank_falls(data_aware):
    proto = matmul_model()
    data = Anisotropic()
    calib, held = data.samples(16), data.samples(8)
    ref = run_ort(proto, held)
    measured, recorded = [], []
    for rank in (48, 32, 16, 8, 4, 2):
        result, out = run_lowrank(proto, f"rank:{rank}", calib=calib, data_aware=data_aware, min_saving=10.0)
        assert result.layers[0]["decision"] == "factorized"
        measured.append(rel_error(ref, run_ort(out, held)))
        recorded.append(result.layers[0]["error"])
    assert all(a < b for a, b in zip(measured, measured[1:])), measured
    assert all(a < b for a, b in zip(recorded, recorded[1:])), recorded
    assert 0 < measured[0] and measured[-1] < 1.0


def test_data_aware_beats_plain_svd_on_anisotropic_inputs():
    proto = matmul_model()
    data = Anisotropic()
    calib, held = data.samples(32), data.samples(16)
    ref = run_ort(proto, held)
    errors = {}
    for data_aware in (False, True):
        result, out = run_lowrank(proto, "rank:8", calib=calib, data_aware=data_aware)
        errors[data_aware] = rel_error(ref, run_ort(out, held))
        if data_aware:  # the recorded output error (on calibration data) predicts held-out error
            assert result.layers[0]["error"] == pytest.approx(errors[True], abs=0.05)
    assert errors[True] < 0.8 * errors[False], errors

    # The layer's own output-space error says the same without ORT (same moment, plain factors).
    x = np.concatenate([s["x"] for s in calib]).astype(np.float64)
    moment = x.T @ x / len(x)
    found = {}
    for whiten in (False, True):
        (layer,) = lowrank_gemm.find_gemm_layers(ir.serde.deserialize_model(proto), None)
        layer.whiten = whiten
        layer.set_input_moment(moment)
        found[whiten] = layer.error(8)
    assert found[True] < 0.8 * found[False]
    assert found[False] == pytest.approx(errors[False], abs=0.05)


def test_not_factorized_when_it_does_not_pay():
    proto = matmul_model(k=16, n=16, x_shape=("batch", 16))
    result, out = run_lowrank(proto, "rank:12", min_params=0)
    (rec,) = result.layers
    assert rec["decision"] == "kept dense (does not pay)" and rec["rank"] == 12
    assert rec["params"][1] > 0.9 * rec["params"][0]  # 12·32 = 384 > 0.9·256
    assert not result.modified and ops(out) == ["MatMul"] and set(init_sizes(out)) == {"W"}

    # Below min_params (default 1024) the layer is not even a candidate: no record, no change.
    result, out = run_lowrank(proto, "rank:2")
    assert [r["decision"] for r in result.layers] == ["kept dense (below 1024 params)"]
    assert not result.modified and ops(out) == ["MatMul"]

    # The full rank itself never pays.
    result, out = run_lowrank(matmul_model(), f"rank:{K}")
    assert result.layers[0]["decision"] == "kept dense (does not pay)" and ops(out) == ["MatMul"]


def test_dynamic_batch_and_3d_input_survive():
    seq = 8
    proto = matmul_model(x_shape=("batch", seq, K))
    data = Anisotropic()
    calib = [{"x": data.draw(2 * seq, lead=(2, seq))} for _ in range(8)]
    result, out = run_lowrank(proto, "rank:16", calib=calib)
    (rec,) = result.layers
    assert rec["decision"] == "factorized" and rec["macs"] == [seq * K * N, seq * 16 * (K + N)]
    assert [d.dim_param for d in out.graph.input[0].type.tensor_type.shape.dim][:1] == ["batch"]
    a, b = initializer(out, "fc.lr_a"), initializer(out, "fc.lr_b")
    for batch in (1, 3):
        feed = [{"x": data.draw(batch * seq, lead=(batch, seq))}]
        (y,), = run_ort(out, feed)
        assert y.shape == (batch, seq, N)
        np.testing.assert_allclose(y, feed[0]["x"] @ a @ b, rtol=1e-4, atol=1e-5)
        assert rel_error(run_ort(proto, feed), [[y]]) < 0.5


def test_global_budget_applies_on_copies_by_name():
    proto = mlp_model()
    data = Anisotropic()
    result, out = run_lowrank(proto, "budget:params=2x", calib=data.samples(8), min_params=0)
    assert {r["name"] for r in result.layers} == {"fc1", "fc2"}
    done = [r for r in result.layers if r["decision"] == "factorized"]
    assert done and result.stats["layer_params_after"] <= result.stats["layer_params_before"] / 2
    assert count_params(result.model)[0] == result.stats["layer_params_after"]
    held = data.samples(4)
    assert rel_error(run_ort(proto, held), run_ort(out, held)) < 1.0


# -- TVM -------------------------------------------------------------------------------------------
def test_rewritten_graph_compiles_with_tvm_and_matches_ort():
    tvm = pytest.importorskip("tvm")
    from edgecomp.targets import get_target
    from edgecomp.targets.lowering import compile_relax, to_relax

    proto = mlp_model()
    data = Anisotropic()
    result, out = run_lowrank(proto, "rank:8", calib=data.samples(8), min_params=0)
    assert ops(out) == ["MatMul", "Gemm", "Relu", "MatMul", "MatMul"]
    assert [r["decision"] for r in result.layers] == ["factorized", "factorized"]
    static = onnx.ModelProto()
    static.CopyFrom(out)
    for value in (*static.graph.input, *static.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 4
    del static.graph.value_info[:]
    rm = to_relax(static, {"x": (4, K)}, {"x": "float32"})
    assert len(rm.params) == 5  # C1 and two factor pairs: the dense weights are gone
    ex = compile_relax(rm, get_target("host"))
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    x = data.draw(4)
    (expected,), = run_ort(out, [{"x": x}])
    got = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(p) for p in rm.params])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_whitening_shrinks_when_calibration_rows_are_few():
    """Fewer calibration rows than input features: the moment is rank-deficient and the whitening
    is shrunk toward the identity (SHRINK·K/rows of the mean diagonal), not fitted to the sample."""
    from edgecomp.passes.lowrank_gemm import RIDGE, SHRINK, GemmLayer

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32))
    x = rng.standard_normal((16, 64))  # 16 rows < K = 64
    layer = GemmLayer("fc", "MatMul", w, w.shape, input_name="x")
    layer.set_input_moment(x.T @ x / 16, rows=16)
    assert layer._ridge == pytest.approx(SHRINK)
    layer.set_input_moment(x.T @ x / 16, rows=64 * 1000)
    assert layer._ridge == pytest.approx(max(RIDGE, SHRINK / 1000))
    # The shrunk whitening still factorizes exactly at full rank.
    a, b = layer.factors(32)
    np.testing.assert_allclose(a @ b, w, atol=1e-4)
