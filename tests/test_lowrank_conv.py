"""Low-rank decomposition of Conv layers (passes/lowrank_conv.py) on tiny graphs, checked with ORT.

Tolerances: an exact decomposition (full rank; CP at the CP rank the weight was built with) must
reproduce the original outputs within 1e-4 of their max magnitude; float32 round-off is ~1e-6.
CP-ALS is not exact at its ``full_rank`` on a generic weight, so CP's exactness checks use weights
built with a known CP rank below ``full_rank``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecomp.numerics import run_ort
from edgecomp.passes import lowrank_conv  # noqa: F401  (registers the "conv" factorizer)
from edgecomp.passes.lowrank import FACTORIZERS, Cost, LowRank, LowRankConfig
from edgecomp.passes.rank_selection import parse_policy

METHODS = ("tucker2", "cp", "spatial")
TOL = 1e-4
OUT_DIMS = ["n_out", "c_out", "h_out", "w_out"]  # a shape the checker accepts, fixing nothing


# -- helpers --------------------------------------------------------------------------------------
def cp_weight(cout: int, cin: int, kh: int, kw: int, rank: int, seed: int = 0) -> np.ndarray:
    """A weight with CP rank ``rank`` (sum of ``rank`` outer products)."""
    rng = np.random.default_rng(seed)
    f = [rng.standard_normal((d, rank)) for d in (cout, cin, kh, kw)]
    return np.einsum("ar,br,cr,dr->abcd", *f).astype(np.float32)


def conv_model(
    cout: int = 16,
    cin: int = 16,
    k: tuple[int, int] = (3, 3),
    hw: tuple[int, int] = (9, 10),
    batch: int | str = 1,
    bias: bool = True,
    group: int = 1,
    weight: np.ndarray | None = None,
    seed: int = 0,
    **attrs,
) -> onnx.ModelProto:
    """y = Conv(x, W[, B]) with W/B initializers; ``attrs`` are Conv attributes (strides, pads...)."""
    rng = np.random.default_rng(seed)
    if weight is None:
        weight = rng.standard_normal((cout, cin // group, *k)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "W")]
    inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(weight.shape[0]).astype(np.float32), "B"))
        inputs.append("B")
    if group != 1:
        attrs["group"] = group
    node = helper.make_node("Conv", inputs, ["y"], name="conv0", **attrs)
    graph = helper.make_graph(
        [node], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cin, *hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, OUT_DIMS)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def config(method: str, policy: str = "ratio:0.5", **kw) -> LowRankConfig:
    kw.setdefault("min_params", 0)
    return LowRankConfig(policy=parse_policy(policy), layers=("conv",), conv_method=method, **kw)


def rewrite(proto: onnx.ModelProto, method: str, policy: str = "ratio:0.5", **kw):
    model = ir.serde.deserialize_model(proto)
    result = LowRank(config(method, policy, **kw), calib=None)(model)
    return ir.serde.serialize_model(result.model), result


def layers_of(model: ir.Model, method: str):
    return FACTORIZERS["conv"](model, config(method))


def apply_direct(proto: onnx.ModelProto, method: str, rank: int | None = None):
    """Decompose the single conv with ``layer.apply`` (the driver keeps rank ≥ full_rank dense)."""
    model = ir.serde.deserialize_model(proto)
    (layer,) = layers_of(model, method)
    layer.apply(model, layer.full_rank if rank is None else rank)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out)
    return out, layer


def x_for(proto: onnx.ModelProto, batch: int = 1, seed: int = 1) -> np.ndarray:
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).standard_normal([batch, *dims[1:]]).astype(np.float32)


def ort(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return run_ort(proto, [{"x": x}])[0][0]


def rel(got: np.ndarray, ref: np.ndarray) -> float:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def chain(proto: onnx.ModelProto) -> list[tuple[str, tuple[int, ...], int, tuple[int, ...]]]:
    """(op, kernel_shape, group, weight shape) of every node, in order."""
    inits = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    out = []
    for n in proto.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        out.append((n.op_type, tuple(a.get("kernel_shape", ())), int(a.get("group", 1)), inits.get(n.input[1], ())))
    return out


# -- structure ------------------------------------------------------------------------------------
EXPECTED_CHAIN = {
    # Conv 16→16 3x3 at POLICY → Tucker-2: rank 8 (r_out = r_in = 8); CP: R = 8; spatial: 12 of 48
    # (spatial SVD at 24 of 48 would cost as much as the dense conv)
    "tucker2": [((1, 1), 1, (8, 16, 1, 1)), ((3, 3), 1, (8, 8, 3, 3)), ((1, 1), 1, (16, 8, 1, 1))],
    "cp": [((1, 1), 1, (8, 16, 1, 1)), ((3, 1), 8, (8, 1, 3, 1)), ((1, 3), 8, (8, 1, 1, 3)), ((1, 1), 1, (16, 8, 1, 1))],
    "spatial": [((3, 1), 1, (12, 16, 3, 1)), ((1, 3), 1, (16, 12, 1, 3))],
}
POLICY = {"tucker2": "ratio:0.5", "cp": "ratio:0.5", "spatial": "ratio:0.25"}


@pytest.mark.parametrize("method", METHODS)
def test_structure_replaces_the_conv_with_the_chain(method):
    proto = conv_model()
    out, result = rewrite(proto, method, POLICY[method])
    assert result.modified and result.layers[0]["decision"] == "factorized"
    got = chain(out)
    assert [(k, g, w) for _, k, g, w in got] == EXPECTED_CHAIN[method]
    assert all(op == "Conv" for op, *_ in got)
    names = {i.name for i in out.graph.initializer}
    assert "W" not in names, "the dense weight must not remain"
    last = out.graph.node[-1]
    assert last.name == "conv0" and list(last.output) == ["y"] and last.input[2] == "B"
    assert all(len(n.input) == 2 for n in out.graph.node[:-1]), "only the last conv carries the bias"
    # The stats record matches the graph: params of the new weights + bias.
    params = sum(int(np.prod(i.dims)) for i in out.graph.initializer)
    assert result.layers[0]["params"] == [16 * 16 * 9 + 16, params]
    assert ort(out, x_for(proto)).shape == ort(proto, x_for(proto)).shape


@pytest.mark.parametrize("method", METHODS)
def test_1x1_conv_is_factorized_by_svd_whatever_the_method(method):
    proto = conv_model(cout=24, cin=16, k=(1, 1), strides=[2, 2], pads=[1, 0, 0, 1])
    out, layer = apply_direct(proto, method)
    assert layer.method == "svd" and layer.full_rank == 16
    assert [(k, g, w) for _, k, g, w in chain(out)] == [((1, 1), 1, (16, 16, 1, 1)), ((1, 1), 1, (24, 16, 1, 1))]
    x = x_for(proto)
    assert rel(ort(out, x), ort(proto, x)) < TOL
    # Weight-space error at rank 4 is the discarded singular values' share of the energy.
    s = np.linalg.svd(numpy_helper.to_array(proto.graph.initializer[0])[:, :, 0, 0].astype(np.float64), compute_uv=False)
    assert layer.error(4) == pytest.approx(np.sqrt((s[4:] ** 2).sum() / (s**2).sum()), rel=1e-9)


# -- numerics at full rank --------------------------------------------------------------------------
GEOMETRY = {
    "plain": {},
    "stride2": {"strides": [2, 2]},
    "asym_pads": {"pads": [1, 0, 2, 1]},
    "dilation2": {"dilations": [2, 2], "pads": [2, 1, 2, 2]},
    "mixed": {"strides": [2, 1], "dilations": [1, 2], "pads": [0, 2, 1, 0]},
    "same_upper_stride": {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", list(GEOMETRY))
@pytest.mark.parametrize("method", METHODS)
def test_exact_decomposition_reproduces_outputs(method, case, bias):
    """Tucker-2 / spatial at full rank, CP at the weight's own CP rank (4 < full rank 12)."""
    if method == "cp":
        proto = conv_model(cout=12, cin=10, k=(3, 2), weight=cp_weight(12, 10, 3, 2, 4), bias=bias, **GEOMETRY[case])
        out, layer = apply_direct(proto, method, rank=4)
    else:
        proto = conv_model(cout=12, cin=10, k=(3, 2), bias=bias, **GEOMETRY[case])
        out, layer = apply_direct(proto, method)
    assert layer.error(4 if method == "cp" else layer.full_rank) < 1e-5
    x = x_for(proto)
    assert rel(ort(out, x), ort(proto, x)) < TOL
    assert len(out.graph.node) == {"tucker2": 3, "cp": 4, "spatial": 2}[method]


def test_cp_at_full_rank_is_approximate_on_a_generic_weight():
    """Documented limitation: CP of a generic 16x16x3x3 weight at R = full_rank (16) is lossy,
    but much better than at a low rank."""
    model = ir.serde.deserialize_model(conv_model())
    (layer,) = layers_of(model, "cp")
    assert layer.full_rank == 16
    assert 0.1 < layer.error(16) < layer.error(4) < 1.0


# -- error vs rank ----------------------------------------------------------------------------------
RANKS = {"tucker2": [16, 14, 12, 8, 4, 2, 1], "cp": [16, 12, 8, 4, 2, 1], "spatial": [48, 40, 32, 24, 16, 8, 1]}


@pytest.mark.parametrize("method", METHODS)
def test_error_grows_as_rank_falls(method):
    """ORT-measured ‖y − y_r‖_F / ‖y‖_F over a batch rises as the rank falls, and tracks the
    layer's weight-space error (white-noise inputs: the two are about equal)."""
    proto = conv_model(hw=(8, 8), seed=3, batch="N")
    x = x_for(proto, batch=8)
    ref = ort(proto, x)
    measured, predicted = [], []
    for i, rank in enumerate(RANKS[method]):
        if i == 0:
            out, layer = apply_direct(proto, method, rank)  # full rank: the driver keeps it dense
        else:
            out, result = rewrite(proto, method, f"rank:{rank}", min_saving=100.0)  # force the rewrite
            assert result.layers[0]["decision"] == "factorized" and result.layers[0]["rank"] == rank
        y = ort(out, x)
        measured.append(float(np.linalg.norm(y - ref) / np.linalg.norm(ref)))
        predicted.append(layer.error(rank))
    assert all(b > a for a, b in zip(measured, measured[1:])), measured
    assert all(b > a for a, b in zip(predicted, predicted[1:])), predicted
    assert np.allclose(measured, predicted, atol=0.05), (measured, predicted)
    assert measured[-1] > 0.9 and (method == "cp" or measured[0] < 1e-5)


# -- what is left alone ------------------------------------------------------------------------------
def test_depthwise_convs_are_left_alone():
    for proto in (
        conv_model(cout=16, cin=16, group=16),  # plain depthwise
        conv_model(cout=32, cin=16, group=16),  # channel multiplier 2
    ):
        model = ir.serde.deserialize_model(proto)
        assert layers_of(model, "tucker2") == []
        out, result = rewrite(proto, "tucker2")
        assert not result.modified and len(out.graph.node) == 1


def test_grouped_convs_are_skipped_deliberately():
    """group=2 Conv 16→16: not decomposed (documented choice), a plain conv after it is."""
    rng = np.random.default_rng(0)
    w_g = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    w_p = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "Wg"], ["h"], name="grouped", group=2, pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["h"], ["hr"], name="relu"),
            helper.make_node("Conv", ["hr", "Wp"], ["y"], name="plain", pads=[1, 1, 1, 1]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, OUT_DIMS)],
        [numpy_helper.from_array(w_g, "Wg"), numpy_helper.from_array(w_p, "Wp")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = ir.serde.deserialize_model(proto)
    assert [layer.name for layer in layers_of(model, "tucker2")] == ["plain"]
    out, result = rewrite(proto, "tucker2")
    assert [r["name"] for r in result.layers] == ["plain"]
    ops = [(n.name, helper.get_attribute_value(a)) for n in out.graph.node for a in n.attribute if a.name == "group"]
    assert ("grouped", 2) in ops and "Wg" in {i.name for i in out.graph.initializer}
    assert len(out.graph.node) == 2 + 3
    # MACs of the plain conv use the spatial size inferred through the Relu (no value_info given).
    (layer,) = layers_of(ir.serde.deserialize_model(proto), "tucker2")
    assert layer.cost(None).macs == 16 * 16 * 9 * 8 * 8


@pytest.mark.parametrize("method,rank,paying", [("tucker2", 7, 3), ("spatial", 22, 6), ("cp", 8, 4)])
def test_no_factorization_when_it_does_not_pay(method, rank, paying):
    """Conv 8→8 3x3: Tucker-2 at rank 7 and spatial at 22 cost more than 0.9x dense; CP only
    stops paying at its full rank (8), which the driver keeps dense."""
    proto = conv_model(cout=8, cin=8, hw=(8, 8))
    out, result = rewrite(proto, method, f"rank:{rank}")
    assert result.layers[0]["decision"] == "kept dense (does not pay)", result.layers[0]
    assert not result.modified and out.graph.node[0].input[1] == "W" and len(out.graph.node) == 1
    # ... while a lower rank does pay, so the test above is about the rank, not the layer.
    _, ok = rewrite(proto, method, f"rank:{paying}")
    assert ok.layers[0]["decision"] == "factorized"


# -- shapes, costs, copies ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_dynamic_batch_survives(method):
    proto = conv_model(batch="N", hw=(8, 8), strides=[2, 2], pads=[1, 1, 1, 1])
    out, result = rewrite(proto, method, POLICY[method])
    assert result.modified
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    x3 = x_for(proto, batch=3)
    y3 = ort(out, x3)
    assert y3.shape == (3, 16, 4, 4)
    for i in range(3):
        yi = ort(out, x3[i : i + 1])
        assert yi.shape == (1, 16, 4, 4)
        np.testing.assert_allclose(yi[0], y3[i], rtol=1e-5, atol=1e-5)
    # The approximation is the one the layer predicts (same order as its weight-space error).
    assert rel(y3, ort(proto, x3)) < 3 * result.layers[0]["error"] + 1e-3
    # An unknown batch counts as 1 in the MAC count.
    assert result.layers[0]["macs"][0] == 16 * 16 * 9 * 4 * 4
    # The chain's inner values do not pin the batch either.
    produced = {o for n in out.graph.node for o in n.output}
    inner = [info for info in out.graph.value_info if info.name in produced]
    assert len(inner) == len(out.graph.node) - 1
    for info in inner:
        dim0 = info.type.tensor_type.shape.dim[0]
        assert not dim0.HasField("dim_value"), f"{info.name} has a fixed batch dim"


def test_cost_counts_params_and_macs_per_stage():
    """Tucker-2 16→32 at rank 16 (r_out=16, r_in=8), stride 2 on 10x10 (output 5x5), batch 2."""
    proto = conv_model(cout=32, cin=16, hw=(10, 10), batch=2, strides=[2, 2], pads=[1, 1, 1, 1])
    model = ir.serde.deserialize_model(proto)
    (layer,) = layers_of(model, "tucker2")
    assert layer.full_rank == 32 and layer.tucker_ranks(16) == (16, 8) and layer.tucker_ranks(1) == (1, 1)
    assert layer.cost(None).params == 32 * 16 * 9 + 32
    assert layer.cost(None).macs == 2 * 32 * 16 * 9 * 25
    c = layer.cost(16)
    assert c.params == 16 * 8 + 16 * 8 * 9 + 32 * 16 + 32
    assert c.macs == 2 * (16 * 8 * 100 + 16 * 8 * 9 * 25 + 16 * 32 * 25)
    # Spectrum: singular values of the unfolding along the larger channel dim (Cout here).
    w = numpy_helper.to_array(proto.graph.initializer[0]).astype(np.float64)
    np.testing.assert_allclose(layer.spectrum(), np.linalg.svd(w.reshape(32, -1), compute_uv=False), rtol=1e-6)
    assert layer.spectrum() is layer.spectrum(), "computed once"
    # auto_pad SAME_UPPER with stride 2 on 9x10: output ceil(9/2) x ceil(10/2) = 5 x 5.
    assert lowrank_conv._out_size(9, 3, 2, 1, 0, 0, "SAME_UPPER") == 5  # the fallback formula
    same = conv_model(cout=32, cin=16, hw=(9, 10), strides=[2, 2], auto_pad="SAME_UPPER")
    assert layers_of(ir.serde.deserialize_model(same), "tucker2")[0].cost(None).macs == 32 * 16 * 9 * 25
    cp = layers_of(ir.serde.deserialize_model(proto), "cp")[0]
    assert cp.cost(8) == Cost(8 * (16 + 3 + 3 + 32) + 32, 2 * (16 * 8 * 100 + 8 * 3 * 5 * 10 + 8 * (3 + 32) * 25))
    sp = layers_of(ir.serde.deserialize_model(proto), "spatial")[0]
    assert sp.full_rank == 48 and sp.cost(8) == Cost(16 * 3 * 8 + 8 * 32 * 3 + 32, 2 * (16 * 3 * 8 * 5 * 10 + 8 * 32 * 3 * 25))


def test_apply_works_on_a_copy_and_caches_per_rank():
    proto = conv_model()
    original = ir.serde.deserialize_model(proto)
    (layer,) = layers_of(original, "tucker2")
    assert layer.decompose(8) is layer.decompose(8)
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(original))
    layer.apply(copy, 8)
    assert len(list(copy.graph)) == 3 and len(list(original.graph)) == 1, "only the copy is rewritten"
    assert "W" in original.graph.initializers and "W" not in copy.graph.initializers
    out = ir.serde.serialize_model(copy)
    onnx.checker.check_model(out)
    x = x_for(proto)
    y, ref = ort(out, x), ort(proto, x)
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) == pytest.approx(layer.error(8), abs=0.1)
    with pytest.raises(ValueError):
        layer.apply(copy, 8)  # the weight is gone: factorized already


def test_mttkrp_matches_tensorly():
    """The contraction handed to tensorly's parafac equals tensorly's own MTTKRP (all modes)."""
    from tensorly.tenalg.core_tenalg.mttkrp import unfolding_dot_khatri_rao

    rng = np.random.default_rng(0)
    t = rng.standard_normal((5, 6, 3, 2))
    factors = [rng.standard_normal((d, 4)) for d in t.shape]
    weights = rng.standard_normal(4)
    for mode in range(4):
        np.testing.assert_allclose(
            lowrank_conv._mttkrp(t, (weights, factors), mode),
            unfolding_dot_khatri_rao(t, (weights, factors), mode),
            rtol=1e-10, atol=1e-12,
        )


@pytest.mark.parametrize("method", METHODS)
def test_decomposition_is_deterministic(method):
    """Two independent runs (fresh layer objects) give bit-identical factors."""
    proto = conv_model()
    runs = [layers_of(ir.serde.deserialize_model(proto), method)[0].decompose(6).stages for _ in range(2)]
    assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(*runs))


def test_unknown_method_is_an_input_error():
    from edgecomp.errors import InputError

    with pytest.raises(InputError, match="conv decomposition"):
        rewrite(conv_model(), "svd3")


# -- TVM ---------------------------------------------------------------------------------------------
def test_rewritten_graph_imports_into_tvm_and_matches_ort():
    """Tucker-2 and CP (depthwise kh×1 / 1×kw convs) chains, one model: import, compile, run."""
    tvm = pytest.importorskip("tvm")
    from edgecomp.targets import get_target
    from edgecomp.targets.lowering import compile_relax, to_relax

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    w2 = cp_weight(16, 16, 3, 3, 4, seed=2)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W1", "B1"], ["h"], name="conv_a", pads=[1, 0, 2, 1], strides=[2, 1]),
            helper.make_node("Relu", ["h"], ["hr"], name="relu"),
            helper.make_node("Conv", ["hr", "W2"], ["y"], name="conv_b", pads=[1, 1, 1, 1], dilations=[1, 2]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 10, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, OUT_DIMS)],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "B1"),
         numpy_helper.from_array(w2, "W2")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = ir.serde.deserialize_model(proto)
    a = layers_of(model, "tucker2")[0]
    b = layers_of(model, "cp")[1]
    a.apply(model, 12)
    b.apply(model, 4)
    out = ir.serde.serialize_model(model)
    assert [n.op_type for n in out.graph.node] == ["Conv"] * 3 + ["Relu"] + ["Conv"] * 4
    x = x_for(out)
    ref = ort(out, x)
    rm = to_relax(out, {"x": x.shape}, {"x": "float32"})
    ex = compile_relax(rm, get_target("host"))
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(p) for p in rm.params])
    got = got.numpy() if hasattr(got, "numpy") else got[0].numpy()
    assert rel(got, ref) < TOL


def test_pointwise_conv_is_data_aware_with_calibration_data():
    """A 1x1 conv whose input channels have very unequal variance: the whitened SVD (channel
    moment over all pixels) beats plain SVD on held-out inputs at the same rank."""
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from edgecomp.numerics import run_ort
    from edgecomp.passes.lowrank import LowRank, LowRankConfig
    from edgecomp.passes.rank_selection import parse_policy

    rng = np.random.default_rng(0)
    cin, cout = 48, 24
    w = (rng.standard_normal((cout, cin, 1, 1)) / np.sqrt(cin)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="pw")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, 6, 6])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    scale = np.logspace(0, -2, cin).astype(np.float32)[None, :, None, None]

    def draw(n):
        return [{"x": (rng.standard_normal((1, cin, 6, 6)).astype(np.float32) * scale)} for _ in range(n)]

    calib, held_out = draw(32), draw(16)
    ref = run_ort(model, held_out)

    def rel_error(data_aware: bool) -> tuple[float, str]:
        cfg = LowRankConfig(policy=parse_policy("rank:8"), layers=("conv",), data_aware=data_aware, min_params=0)
        result = LowRank(cfg, calib)(ir.serde.deserialize_model(model))
        (layer,) = result.layers
        assert layer["decision"] == "factorized"
        # Whitened or not, a 1x1 conv is a [Cout, Cin] matrix: same rank bound and costs.
        assert layer["full_rank"] == 24 and layer["params"] == [cin * cout, 8 * (cin + cout)]
        got = run_ort(ir.serde.serialize_model(result.model), held_out)
        num = sum(float(np.sum((g[0] - r[0]) ** 2)) for g, r in zip(got, ref))
        den = sum(float(np.sum(r[0] ** 2)) for r in ref)
        return np.sqrt(num / den), layer["method"]

    plain, m_plain = rel_error(False)
    whitened, m_white = rel_error(True)
    assert (m_plain, m_white) == ("svd", "whitened-svd")
    assert whitened < 0.7 * plain  # measured: 0.41 vs 0.73
