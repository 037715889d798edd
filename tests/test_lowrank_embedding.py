"""Factorized embedding tables (passes/lowrank_embedding.py): Gather(T, ids) → MatMul(Gather(A, ids), B)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecomp.numerics import run_ort
from edgecomp.passes import lowrank_embedding as emb  # registers the "embedding" factorizer
from edgecomp.passes.lowrank import FACTORIZERS, LowRank, LowRankConfig
from edgecomp.passes.rank_selection import parse_policy

V, D = 300, 48


def _model(table: np.ndarray, ids_shape=("batch", "seq"), tied: bool = False) -> onnx.ModelProto:
    d = table.shape[1]
    nodes = [helper.make_node("Gather", ["T", "ids"], ["e"], name="embed", axis=0),
             helper.make_node("Relu", ["e"], ["h"], name="act")]
    outputs = [helper.make_tensor_value_info("e", TensorProto.FLOAT, [*ids_shape, d]),
               helper.make_tensor_value_info("h", TensorProto.FLOAT, [*ids_shape, d])]
    if tied:  # the LM head reuses the table: h · Tᵀ
        nodes.append(helper.make_node("Gemm", ["h2d", "T"], ["logits"], name="head", transB=1))
        nodes.insert(2, helper.make_node("Reshape", ["h", "flat"], ["h2d"], name="flatten"))
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", table.shape[0]]))
    inits = [numpy_helper.from_array(table, "T"), numpy_helper.from_array(np.array([-1, d], np.int64), "flat")]
    graph = helper.make_graph(nodes, "embed", [helper.make_tensor_value_info("ids", TensorProto.INT64, list(ids_shape))],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _table(rank: int | None = None, v: int = V, d: int = D, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if rank is None:
        return rng.standard_normal((v, d)).astype(np.float32)
    t = rng.standard_normal((v, rank)) @ rng.standard_normal((rank, d)) / np.sqrt(rank)
    return (t + noise * rng.standard_normal((v, d))).astype(np.float32)


def _ids(*shape, v: int = V, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, v, size=shape).astype(np.int64)


def _layer(proto) -> tuple[ir.Model, emb.EmbeddingLayer]:
    model = ir.serde.deserialize_model(proto)
    layers = FACTORIZERS["embedding"](model, LowRankConfig(policy=parse_policy("rank:1"), layers=("embedding",)))
    assert len(layers) == 1
    return model, layers[0]


def _run_pass(proto, policy: str, min_params: int = 1024):
    model = ir.serde.deserialize_model(proto)
    config = LowRankConfig(policy=parse_policy(policy), layers=("embedding",), min_params=min_params)
    result = LowRank(config, calib=None)(model)
    return ir.serde.serialize_model(result.model), result


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def _driver_pays_on_params_alone() -> bool:
    """Does LowRank accept a layer that saves params but adds MACs (its ``saves == ("params",)``)?"""
    _, layer = _layer(_model(_table(v=64, d=32)))
    return LowRank(LowRankConfig(policy=parse_policy("rank:1"), layers=("embedding",)))._pays(layer, 1)


# The driver's "pays" rule wants MACs to fall too; an embedding's MACs rise from 0 by design.
# These tests pin the intended behaviour; they xfail (strictly) until the driver honours
# ``layer.saves`` (see the report), then run as ordinary tests.
needs_params_only_rule = pytest.mark.xfail(
    not _driver_pays_on_params_alone(), strict=True,
    reason="passes/lowrank.py _pays() requires low.macs <= min_saving * dense.macs, and a dense lookup has 0 MACs",
)


def test_layer_costs_and_spectrum():
    model, layer = _layer(_model(_table(rank=6), ids_shape=(4, 5)))
    assert (layer.name, layer.op, layer.method, layer.weight_shape) == ("embed", "Gather", "svd", (V, D))
    assert layer.full_rank == D and len(layer.spectrum()) == D and (layer.input_name, layer.input_stat) == ("ids", "counts")
    assert layer.cost(None) == emb.Cost(V * D, 0)
    assert layer.cost(6) == emb.Cost(6 * (V + D), 4 * 5 * 6 * D)  # 20 ids looked up
    assert _layer(_model(_table(rank=6)))[1].cost(6).macs == 6 * D  # dynamic [batch, seq] → 1 id
    assert np.sum(layer.spectrum() > 1e-5 * layer.spectrum()[0]) == 6
    assert parse_policy("energy:0.9999").layer_rank("embed", layer.spectrum(), layer.full_rank) <= 6


def test_full_rank_reproduces_the_table():
    proto = _model(_table())
    model, layer = _layer(proto)
    assert layer.error(layer.full_rank) < 1e-7
    layer.apply(model, layer.full_rank)  # the driver never picks rank ≥ full_rank: apply directly
    new = ir.serde.serialize_model(model)
    assert [n.op_type for n in new.graph.node] == ["Gather", "MatMul", "Relu"]
    ids = _ids(3, 7)
    ref, got = run_ort(proto, [{"ids": ids}])[0], run_ort(new, [{"ids": ids}])[0]
    assert _rel(ref[0], got[0]) < 1e-4 and _rel(ref[1], got[1]) < 1e-4


def test_error_grows_as_rank_falls_and_matches_the_rows():
    table = _table(rank=12, noise=0.05)
    proto = _model(table)
    model, layer = _layer(proto)
    ranks = [D, 24, 12, 8, 4, 2, 1]
    errors = [layer.error(r) for r in ranks]
    assert errors[0] < 1e-7 and all(b > a for a, b in zip(errors, errors[1:])), errors
    # the error is the relative Frobenius error of the rows the factorized graph produces
    layer.apply(model, 8)
    all_rows = np.arange(V, dtype=np.int64).reshape(1, V)
    got = run_ort(ir.serde.serialize_model(model), [{"ids": all_rows}])[0][0][0]
    measured = np.linalg.norm(got - table) / np.linalg.norm(table)
    assert abs(measured - layer.error(8)) < 1e-4


def test_exact_low_rank_table_is_reproduced_at_its_rank():
    proto = _model(_table(rank=6))
    model, layer = _layer(proto)
    assert layer.error(6) < 1e-6 and layer.error(5) > 1e-2
    layer.apply(model, 6)
    new = ir.serde.serialize_model(model)
    inits = {i.name: tuple(i.dims) for i in new.graph.initializer}
    assert inits == {"embed_lr_A": (V, 6), "embed_lr_B": (6, D), "flat": (2,)}  # T removed
    ids = _ids(2, 9)
    ref, got = run_ort(proto, [{"ids": ids}])[0], run_ort(new, [{"ids": ids}])[0]
    assert _rel(ref[0], got[0]) < 1e-4


@needs_params_only_rule
def test_structure_after_the_pass():
    proto = _model(_table(rank=6, noise=1e-4))
    new, result = _run_pass(proto, "energy:0.999")
    rec = result.layers[0]
    assert (rec["name"], rec["op"], rec["method"], rec["decision"]) == ("embed", "Gather", "svd", "factorized")
    assert rec["rank"] == 6 and rec["params"] == [V * D, 6 * (V + D)] and rec["macs"] == [0, 6 * D]
    assert [n.op_type for n in new.graph.node] == ["Gather", "MatMul", "Relu"]
    gather, matmul = new.graph.node[:2]
    assert gather.input[1] == "ids" and matmul.output[0] == "e" and new.graph.node[2].input[0] == "e"
    inits = {i.name: tuple(i.dims) for i in new.graph.initializer}
    assert "T" not in inits and inits["embed_lr_A"] == (V, 6) and inits["embed_lr_B"] == (6, D)
    ids = _ids(2, 5)
    assert _rel(run_ort(proto, [{"ids": ids}])[0][0], run_ort(new, [{"ids": ids}])[0][0]) < 1e-3


@needs_params_only_rule
def test_dynamic_batch_and_sequence_survive():
    proto = _model(_table(rank=5), ids_shape=("batch", "seq"))
    new, result = _run_pass(proto, "rank:5")
    assert result.layers[0]["decision"] == "factorized"
    out = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in new.graph.output}
    assert out["e"] == ["batch", "seq", D]
    for shape in [(1, 3), (4, 11)]:
        ids = _ids(*shape, seed=shape[1])
        ref, got = run_ort(proto, [{"ids": ids}])[0], run_ort(new, [{"ids": ids}])[0]
        assert got[0].shape == (*shape, D) and _rel(ref[0], got[0]) < 1e-4


def test_dynamic_ids_with_apply():
    """The same as above without the driver (runs whatever the driver's rule)."""
    proto = _model(_table(rank=5), ids_shape=("batch", "seq"))
    model, layer = _layer(proto)
    layer.apply(model, 5)
    new = ir.serde.serialize_model(model)
    for shape in [(1, 3), (4, 11)]:
        ids = _ids(*shape, seed=shape[1])
        ref, got = run_ort(proto, [{"ids": ids}])[0], run_ort(new, [{"ids": ids}])[0]
        assert got[0].shape == (*shape, D) and _rel(ref[0], got[0]) < 1e-4


def test_no_factorization_when_it_does_not_pay():
    # a small table: under min_params → kept dense (or not listed)
    new, small = _run_pass(_model(_table(v=20, d=8)), "rank:2")
    assert all(r["decision"].startswith("kept dense") for r in small.layers) and not small.modified
    assert [n.op_type for n in new.graph.node] == ["Gather", "Relu"]
    # a high rank of a square table: r·(V+D) > V·D, params alone say no
    square = _model(_table(v=64, d=64))
    _, layer = _layer(square)
    assert layer.cost(40).params > layer.cost(None).params
    new, result = _run_pass(square, "rank:40")
    assert result.layers[0]["decision"] == "kept dense (does not pay)" and not result.modified
    assert [n.op_type for n in new.graph.node] == ["Gather", "Relu"]
    # a table shared with the LM head (tied embeddings): factorizing the lookup frees nothing
    tied = ir.serde.deserialize_model(_model(_table(rank=4), tied=True))
    assert FACTORIZERS["embedding"](tied, LowRankConfig(policy=parse_policy("rank:4"))) == []
    # constant ids or axis 1 are not lookups of token rows
    axis1 = _model(_table(rank=4))
    axis1.graph.node[0].attribute[0].i = 1
    assert FACTORIZERS["embedding"](ir.serde.deserialize_model(axis1), None) == []


def test_imports_into_tvm_and_matches_ort():
    tvm = pytest.importorskip("tvm")
    from edgecomp.targets import get_target
    from edgecomp.targets.lowering import compile_relax, to_relax

    proto = _model(_table(rank=6), ids_shape=(2, 5))
    model, layer = _layer(proto)
    layer.apply(model, 6)
    new = ir.serde.serialize_model(model)
    rm = to_relax(new, {"ids": (2, 5)}, {"ids": "int64"})
    ex = compile_relax(rm, get_target("host"))
    ids = _ids(2, 5)
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(ids), *[tvm.runtime.tensor(p) for p in rm.params])
    outs = [o.numpy() for o in got]
    ref = run_ort(new, [{"ids": ids}])[0]
    assert len(outs) == len(ref) == 2
    for a, b in zip(ref, outs):
        assert b.shape == (2, 5, D) and _rel(a, b) < 1e-4
    assert _rel(run_ort(proto, [{"ids": ids}])[0][0], outs[0]) < 1e-4


def test_frequency_weighted_svd_favours_the_ids_that_are_looked_up():
    """With calibration ids, the rows looked up often are approximated better than by plain SVD
    at the same rank (held-out lookups from the same skewed distribution), and at full rank the
    weighted factors still reproduce the table."""
    table = _table()
    rng = np.random.default_rng(3)
    hot = rng.choice(V, size=20, replace=False)  # a Zipf-like vocabulary: 20 ids carry the traffic

    def draw(n):
        return [{"ids": rng.choice(hot, size=(1, 16)).astype(np.int64)} for _ in range(n)]

    calib, held_out = draw(16), draw(8)
    proto = _model(table, ids_shape=(1, 16))
    ref = run_ort(proto, held_out, ["e"])

    def error(data_aware: bool) -> tuple[float, str]:
        model = ir.serde.deserialize_model(proto)
        cfg = LowRankConfig(policy=parse_policy("rank:24"), layers=("embedding",), data_aware=data_aware)
        result = LowRank(cfg, calib)(model)
        (rec,) = result.layers
        got = run_ort(ir.serde.serialize_model(result.model), held_out, ["e"])
        return max(_rel(r[0], g[0]) for r, g in zip(ref, got)), rec["method"]

    plain, m0 = error(False)
    weighted, m1 = error(True)
    assert (m0, m1) == ("svd", "weighted-svd")
    assert weighted < 0.2 * plain, (weighted, plain)  # the 20 hot rows fit in rank 24 once weighted
    # Exact at full rank whatever the weights.
    model, layer = _layer(proto)
    layer.set_input_counts(np.bincount(np.concatenate([c["ids"].ravel() for c in calib]), minlength=V))
    a, b = layer.factors(D)
    np.testing.assert_allclose(a @ b, table, atol=1e-4)
