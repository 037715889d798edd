"""Tensor-train factorization of fully-connected layers (passes/tensor_train.py).

Tiny MatMul/Gemm graphs through the LowRank driver, checked structurally and against ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecomp.numerics import run_ort
from edgecomp.passes import tensor_train as tt  # registers the "tt" factorizer
from edgecomp.passes.lowrank import FACTORIZERS, LowRank, LowRankConfig
from edgecomp.passes.rank_selection import parse_policy

K, N = 144, 256  # → (3,4,3,4) × (4,4,4,4): modes 12,16,12,16; full TT rank 192


def _model(w: np.ndarray, x_shape=("batch", K), gemm: dict | None = None, bias: np.ndarray | None = None) -> onnx.ModelProto:
    n_out = w.shape[0] if gemm and gemm.get("transB") else w.shape[1]
    inits = [numpy_helper.from_array(w, "W")]
    if gemm is not None:
        inputs = ["x", "W"]
        if bias is not None:
            inits.append(numpy_helper.from_array(bias, "C"))
            inputs.append("C")
        node = helper.make_node("Gemm", inputs, ["y"], name="fc", **gemm)
    else:
        node = helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")
    relu = helper.make_node("Relu", ["y"], ["z"], name="act")  # a consumer of the rewritten value
    graph = helper.make_graph(
        [node, relu], "fc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*x_shape[:-1], n_out]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [*x_shape[:-1], n_out])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _tt_weight(ks, ns, rank, seed=0) -> np.ndarray:
    """A [∏ks, ∏ns] weight of TT rank exactly ``rank`` (random cores)."""
    rng = np.random.default_rng(seed)
    d = len(ks)
    ranks = [1] + [rank] * (d - 1) + [1]
    out = np.ones((1, 1, 1))
    for i in range(d):
        g = rng.standard_normal((ranks[i], ks[i], ns[i], ranks[i + 1])) / np.sqrt(ranks[i] * ks[i])
        out = np.einsum("abr,rknq->akbnq", out, g).reshape(out.shape[0] * ks[i], out.shape[1] * ns[i], ranks[i + 1])
    return out[:, :, 0].astype(np.float32)


def _random(shape, seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)


def _run_pass(proto, policy: str, min_params: int = 1024):
    model = ir.serde.deserialize_model(proto)
    result = LowRank(LowRankConfig(policy=parse_policy(policy), layers=("tt",), min_params=min_params), calib=None)(model)
    return ir.serde.serialize_model(result.model), result


def _layer(proto) -> tuple[ir.Model, tt.TTLayer]:
    model = ir.serde.deserialize_model(proto)
    layers = FACTORIZERS["tt"](model, LowRankConfig(policy=parse_policy("rank:1"), layers=("tt",)))
    assert len(layers) == 1
    return model, layers[0]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def _x(*shape, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _inits(proto) -> dict[str, tuple[int, ...]]:
    return {i.name: tuple(i.dims) for i in proto.graph.initializer}


# -- the dimension factorization rule ----------------------------------------------------------
def test_dimension_factorization_rule():
    assert tt.factorize_dims(784, 1024) == ((4, 7, 4, 7), (4, 8, 4, 8))
    assert tt.factorize_dims(K, N) == ((3, 4, 3, 4), (4, 4, 4, 4))
    assert tt.factorize_dims(768, 3072) == ((4, 6, 4, 8), (6, 8, 8, 8))
    assert tt.factorize_dims(64, 64) == ((4, 4, 4), (4, 4, 4))  # 4 cores would need factors of 2
    assert tt.factorize_dims(96, 48) == ((4, 4, 6), (3, 4, 4))
    assert tt.factorize_dims(32, 36) == ((4, 8), (6, 6))
    assert tt.factorize_dims(784, 10) is None  # 10 = 2·5: factor 2 < MIN_FACTOR
    assert tt.factorize_dims(97, 64) is None  # prime
    assert tt.factorize_dims(68, 64) is None  # 4·17: too unbalanced
    # the pass uses the rule: a 784×1024 layer is found with those factors (no SVD needed for it)
    model, layer = _layer(_model(_random((784, 1024))))
    assert (layer.ks, layer.ns, layer.full_rank) == ((4, 7, 4, 7), (4, 8, 4, 8), 896)  # cut 28·32 | 28·32
    assert layer.cost(None).params == 784 * 1024
    assert layer.ranks(16) == [1, 16, 16, 16, 1]
    assert layer.cost(16).params == 16 * 16 + 16 * 56 * 16 + 16 * 16 * 16 + 16 * 56  # 19584


# -- structure through the driver --------------------------------------------------------------
def test_structure_after_the_pass():
    proto = _model(_random((K, N)))
    new, result = _run_pass(proto, "rank:4")
    rec = result.layers[0]
    assert (rec["name"], rec["op"], rec["method"], rec["decision"]) == ("fc", "MatMul", "tt", "factorized")
    assert rec["rank"] == 4 and rec["full_rank"] == 192 and rec["weight_shape"] == [K, N]
    assert rec["params"] == [K * N, 3 * 4 * 4 + 4 * 4 * 4 * 4 + 4 * 3 * 4 * 4 + 4 * 4 * 4]
    assert [n.op_type for n in new.graph.node] == ["Reshape", "MatMul"] * 4 + ["Reshape", "Relu"]
    inits = _inits(new)
    assert "W" not in inits
    # cores stored matmul-ready: C_i = G_i as [n_i·r_i, r_{i-1}·k_i], the last as [r·k_4, n_4]
    assert [inits[f"fc_tt_core{i}"] for i in range(4)] == [(16, 3), (16, 16), (16, 12), (16, 4)]
    assert new.graph.node[-2].output[0] == "y" and new.graph.node[-1].input[0] == "y"
    x = _x(3, K)
    ref, got = run_ort(proto, [{"x": x}])[0], run_ort(new, [{"x": x}])[0]
    _, layer = _layer(proto)
    expect = x.astype(np.float64) @ layer.reconstruct(4)  # the graph computes exactly x·W_R
    assert _rel(expect, got[0]) < 1e-4
    assert 0 < rec["error"] < 1 and _rel(ref[0], got[0]) > 1e-2


def test_full_rank_reproduces_the_layer():
    proto = _model(_random((K, N)))
    model, layer = _layer(proto)
    assert layer.error(layer.full_rank) < 1e-6
    layer.apply(model, layer.full_rank)  # the driver never picks rank ≥ full_rank: apply directly
    new = ir.serde.serialize_model(model)
    x = _x(5, K)
    ref, got = run_ort(proto, [{"x": x}])[0], run_ort(new, [{"x": x}])[0]
    assert _rel(ref[0], got[0]) < 1e-4 and _rel(ref[1], got[1]) < 1e-4


def test_apply_to_a_copy_leaves_the_original_alone():
    proto = _model(_random((K, N)))
    model, layer = _layer(proto)
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    layer.apply(copy, 8)
    assert [n.op_type for n in model.graph] == ["MatMul", "Relu"] and "W" in model.graph.initializers
    assert "W" not in copy.graph.initializers and any(n.op_type == "Reshape" for n in copy.graph)


def test_error_grows_as_rank_falls():
    _, layer = _layer(_model(_random((K, N))))
    ranks = [192, 96, 48, 24, 12, 6, 3, 1]
    errors = [layer.error(r) for r in ranks]
    assert errors[0] < 1e-6
    assert all(b > a for a, b in zip(errors, errors[1:])), errors
    params = [layer.cost(r).params for r in ranks]
    assert all(b < a for a, b in zip(params, params[1:])), params


def test_exact_low_tt_rank_weight_is_reproduced_at_its_rank():
    ks, ns = (3, 4, 3, 4), (4, 4, 4, 4)
    w = _tt_weight(ks, ns, rank=3)
    proto = _model(w)
    _, layer = _layer(proto)
    assert (layer.ks, layer.ns) == (ks, ns)
    assert layer.error(3) < 1e-5 and layer.error(2) > 1e-2
    assert np.sum(layer.spectrum() > 1e-6 * layer.spectrum()[0]) == 3
    # energy/erank pick the true rank from the spectrum of the middle unfolding
    assert parse_policy("energy:0.999999").layer_rank("fc", layer.spectrum(), layer.full_rank) == 3
    assert parse_policy("erank").layer_rank("fc", layer.spectrum(), layer.full_rank) <= 3
    new, result = _run_pass(proto, "energy:0.999999")
    assert result.layers[0]["rank"] == 3 and result.layers[0]["decision"] == "factorized"
    x = _x(4, K)
    ref, got = run_ort(proto, [{"x": x}])[0], run_ort(new, [{"x": x}])[0]
    assert _rel(ref[0], got[0]) < 1e-4


def test_no_factorization_when_it_does_not_pay():
    # too small: under min_params, kept dense (or not listed)
    new, small = _run_pass(_model(_random((24, 24)), x_shape=("batch", 24)), "rank:2")
    assert all(r["decision"].startswith("kept dense") for r in small.layers) and not small.modified
    assert [n.op_type for n in new.graph.node] == ["MatMul", "Relu"]
    # a prime input dim / an unbalanced output dim: not listed
    _, prime = _run_pass(_model(_random((97, 256)), x_shape=("batch", 97)), "rank:2")
    _, lopsided = _run_pass(_model(_random((K, 68)), x_shape=("batch", K)), "rank:2")
    assert prime.layers == [] and lopsided.layers == []
    # listed but a high rank costs more than the dense layer: kept dense, graph untouched
    proto = _model(_random((K, N)))
    new, result = _run_pass(proto, "rank:128")
    assert result.layers[0]["decision"] == "kept dense (does not pay)" and not result.modified
    _, layer = _layer(proto)
    assert layer.cost(128).params > K * N
    # TT pays in params long before it pays in MACs: rank 8 needs 18x fewer params but 3x the MACs
    assert layer.cost(8).params < K * N / 8 and layer.cost(8).macs > layer.cost(None).macs
    assert [n.op_type for n in new.graph.node] == ["MatMul", "Relu"]


@pytest.mark.parametrize("x_shape", [("batch", K), ("batch", "seq", K)])
def test_dynamic_batch_dims_survive(x_shape):
    proto = _model(_tt_weight((3, 4, 3, 4), (4, 4, 4, 4), rank=3, seed=3), x_shape=x_shape)
    new, result = _run_pass(proto, "rank:3")
    assert result.layers[0]["decision"] == "factorized"
    ops = [n.op_type for n in new.graph.node]
    assert ("Shape" in ops) == (len(x_shape) == 3)  # two unknown dims need the shape computed
    out = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in new.graph.output}
    assert out["y"] == [*x_shape[:-1], N]
    for lead in ([1], [7]) if len(x_shape) == 2 else ([1, 3], [4, 2]):
        x = _x(*lead, K, seed=len(lead) + lead[0])
        ref, got = run_ort(proto, [{"x": x}])[0], run_ort(new, [{"x": x}])[0]
        assert got[0].shape == (*lead, N)
        assert _rel(ref[0], got[0]) < 1e-4


def test_gemm_trans_b_with_bias():
    rng = np.random.default_rng(7)
    w_t = _tt_weight((3, 4, 3, 4), (4, 4, 4, 4), rank=4, seed=5).T.copy()  # stored [N, K]
    c = rng.standard_normal(N).astype(np.float32)
    proto = _model(w_t, x_shape=(6, K), gemm={"transB": 1, "alpha": 0.5, "beta": 2.0}, bias=c)
    model, layer = _layer(proto)
    assert layer.op == "Gemm" and layer.weight_shape == (N, K) and (layer.ks, layer.ns) == ((3, 4, 3, 4), (4, 4, 4, 4))
    assert layer.cost(None) == tt.Cost(K * N + N, 6 * K * N)  # rows from the static shape
    new, result = _run_pass(proto, "rank:4")
    assert result.layers[0]["decision"] == "factorized"
    inits = _inits(new)
    assert "W" not in inits and "C" not in inits and inits["fc_tt_bias"] == (N,)
    assert [n.op_type for n in new.graph.node][-3:] == ["Reshape", "Add", "Relu"]
    x = _x(6, K)
    ref, got = run_ort(proto, [{"x": x}])[0], run_ort(new, [{"x": x}])[0]
    assert _rel(ref[0], got[0]) < 1e-4
    np.testing.assert_allclose(got[0], 0.5 * x @ w_t.T + 2.0 * c, rtol=1e-3, atol=1e-4)
    # a low rank changes the weight term only: the bias is still beta·C exactly
    model, layer = _layer(proto)
    layer.apply(model, 1)
    low = run_ort(ir.serde.serialize_model(model), [{"x": np.zeros((6, K), np.float32)}])[0][0]
    np.testing.assert_allclose(low, np.broadcast_to(2.0 * c, (6, N)), rtol=1e-6)


def test_gemm_with_a_computed_bias():
    """C is not a constant: the rewrite adds beta·C at run time."""
    w = _tt_weight((3, 4, 3, 4), (4, 4, 4, 4), rank=4, seed=6)
    node = helper.make_node("Gemm", ["x", "W", "c"], ["y"], name="fc", beta=-1.5)
    graph = helper.make_graph(
        [node], "fc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K]), helper.make_tensor_value_info("c", TensorProto.FLOAT, [N])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", N])], [numpy_helper.from_array(w, "W")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model, layer = _layer(proto)
    assert layer.bias is None and layer.cost(None).params == K * N
    layer.apply(model, 4)
    new = ir.serde.serialize_model(model)
    assert [n.op_type for n in new.graph.node][-2:] == ["Mul", "Add"]
    feed = {"x": _x(3, K), "c": _x(N, seed=4)}
    assert _rel(run_ort(proto, [feed])[0][0], run_ort(new, [feed])[0][0]) < 1e-4


def test_input_moment_gives_output_space_error():
    _, layer = _layer(_model(_random((K, N))))
    weight_err = layer.error(8)
    layer.set_input_moment(np.eye(K) * 3.0)  # white inputs: the same relative error
    assert abs(layer.error(8) - weight_err) < 1e-9
    rng = np.random.default_rng(2)
    xs = rng.standard_normal((4096, K)) * np.linspace(0.1, 2.0, K)  # coloured inputs
    layer.set_input_moment(xs.T @ xs / len(xs))
    w = layer._w
    measured = np.linalg.norm(xs @ (w - layer.reconstruct(8))) / np.linalg.norm(xs @ w)
    assert abs(layer.error(8) - measured) < 1e-9


def test_imports_into_tvm_and_matches_ort():
    tvm = pytest.importorskip("tvm")
    from edgecomp.targets import get_target
    from edgecomp.targets.lowering import compile_relax, to_relax

    proto = _model(_tt_weight((3, 4, 3, 4), (4, 4, 4, 4), rank=4, seed=9), x_shape=(2, K))
    new, result = _run_pass(proto, "rank:4")
    assert result.layers[0]["decision"] == "factorized"
    rm = to_relax(new, {"x": (2, K)}, {"x": "float32"})
    ex = compile_relax(rm, get_target("host"))
    x = _x(2, K)
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(p) for p in rm.params])
    outs = [o.numpy() for o in got]  # two graph outputs: y and Relu(y)
    ref = run_ort(new, [{"x": x}])[0]
    assert len(outs) == len(ref) == 2
    for a, b in zip(ref, outs):
        assert b.shape == (2, N) and _rel(a, b) < 1e-4
    assert _rel(run_ort(proto, [{"x": x}])[0][0], outs[0]) < 1e-4  # the weight has TT rank 4
