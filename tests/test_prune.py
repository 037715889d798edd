"""Pruning (passes/prune.py): magnitude, N:M and channel pruning on tiny graphs, checked by
counting what was zeroed or removed and by ONNX Runtime numerics; the spec grammar; the CLI.

The exactness checks of channel pruning compare the shrunk graph with the *original* graph whose
removed channels were zeroed instead (filter, bias and BN shift): removing a channel that
contributes nothing must not change a single output, whatever the other channels hold.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecomp.cli import main
from edgecomp.errors import InputError
from edgecomp.numerics import run_ort
from edgecomp.passes import PassContext, default_pass_names
from edgecomp.passes.prune import Prune, PruneConfig, parse_prune

RNG_SEED = 0


# -- tiny models -----------------------------------------------------------------------------------
def _model(nodes, inits, x_shape, y_shape, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))],
        [numpy_helper.from_array(v if np.asarray(v).dtype == np.int64 else np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp(k=32, h=48, n=16, seed=RNG_SEED, scale2=1.0):
    """x → Gemm(W1ᵀ, C1) → Relu → MatMul(W2) → Add(c2) → y; W1 is [h, k] (transB=1)."""
    rng = np.random.default_rng(seed)
    inits = {
        "W1": rng.standard_normal((h, k)) / np.sqrt(k),
        "C1": 0.1 * rng.standard_normal(h),
        "W2": scale2 * rng.standard_normal((h, n)) / np.sqrt(h),
        "c2": 0.1 * rng.standard_normal(n),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "C1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("MatMul", ["hr", "W2"], ["z"], name="fc2"),
        helper.make_node("Add", ["z", "c2"], ["y"], name="bias2"),
    ]
    return _model(nodes, inits, (2, k), (2, n))


def cnn(cin=4, c1=8, c2=12, hw=8, classes=5, seed=RNG_SEED, flatten="Flatten"):
    """x → Conv 3x3 → BN → Relu → Conv 3x3 → Relu → MaxPool 2 → Flatten|Reshape → Gemm → y."""
    rng = np.random.default_rng(seed)
    feat = c2 * (hw // 2) ** 2
    inits = {
        "W1": rng.standard_normal((c1, cin, 3, 3)) / np.sqrt(cin * 9),
        "B1": 0.1 * rng.standard_normal(c1),
        "g": 1 + 0.2 * rng.standard_normal(c1),
        "beta": 0.1 * rng.standard_normal(c1),
        "mean": 0.1 * rng.standard_normal(c1),
        "var": 0.5 + rng.random(c1),
        "W2": rng.standard_normal((c2, c1, 3, 3)) / np.sqrt(c1 * 9),
        "B2": 0.1 * rng.standard_normal(c2),
        "W3": rng.standard_normal((classes, feat)) / np.sqrt(feat),
        "B3": 0.1 * rng.standard_normal(classes),
    }
    if flatten == "Flatten":
        flat = helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1)
    else:  # Reshape to [1, -1] or to the explicit [1, C·H·W]
        inits["shape"] = np.array([1, -1 if flatten == "Reshape-1" else feat], np.int64)
        flat = helper.make_node("Reshape", ["p", "shape"], ["f"], name="reshape")
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["a", "g", "beta", "mean", "var"], ["b"], name="bn1"),
        helper.make_node("Relu", ["b"], ["r"], name="relu1"),
        helper.make_node("Conv", ["r", "W2", "B2"], ["c"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["rc"], name="relu2"),
        helper.make_node("MaxPool", ["rc"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        flat,
        helper.make_node("Gemm", ["f", "W3", "B3"], ["y"], name="fc", transB=1),
    ]
    return _model(nodes, inits, (1, cin, hw, hw), (1, classes))


def inverted_residual(cin=8, expand=24, cout=8, hw=6, seed=RNG_SEED):
    """MobileNetV2's block: 1x1 expand → BN → Clip(0, 6) → depthwise 3x3 → BN → Clip → 1x1
    project → BN → + x (the residual Add reads the project's output, not the pruned channels)."""
    rng = np.random.default_rng(seed)

    def bn(prefix, c):
        return {
            f"{prefix}_g": 1 + 0.2 * rng.standard_normal(c), f"{prefix}_b": 0.1 * rng.standard_normal(c),
            f"{prefix}_m": 0.1 * rng.standard_normal(c), f"{prefix}_v": 0.5 + rng.random(c),
        }

    inits = {
        "We": rng.standard_normal((expand, cin, 1, 1)) / np.sqrt(cin),
        **bn("bn1", expand),
        "Wd": rng.standard_normal((expand, 1, 3, 3)) / 3,
        **bn("bn2", expand),
        "Wp": rng.standard_normal((cout, expand, 1, 1)) / np.sqrt(expand),
        **bn("bn3", cout),
        "lo": np.float32(0.0), "hi": np.float32(6.0),
    }

    def bn_node(prefix, x, y):
        return helper.make_node("BatchNormalization", [x, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"], [y], name=prefix)

    nodes = [
        helper.make_node("Conv", ["x", "We"], ["e"], name="expand"),
        bn_node("bn1", "e", "e1"),
        helper.make_node("Clip", ["e1", "lo", "hi"], ["e2"], name="clip1"),
        helper.make_node("Conv", ["e2", "Wd"], ["d"], name="dw", group=expand, pads=[1, 1, 1, 1]),
        bn_node("bn2", "d", "d1"),
        helper.make_node("Clip", ["d1", "lo", "hi"], ["d2"], name="clip2"),
        helper.make_node("Conv", ["d2", "Wp"], ["p"], name="project"),
        bn_node("bn3", "p", "p1"),
        helper.make_node("Add", ["p1", "x"], ["y"], name="residual"),
    ]
    return _model(nodes, inits, (1, cin, hw, hw), (1, cout, hw, hw))


# -- helpers ---------------------------------------------------------------------------------------
def run_prune(proto, spec, calib=None):
    config = parse_prune(spec) if isinstance(spec, str) else spec
    result = Prune(config, calib)(ir.serde.deserialize_model(proto))
    out = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(out, full_check=True)  # shapes along the chains stay consistent
    return result, out


def arrays(proto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def with_arrays(proto, new: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for t in out.graph.initializer:
        if t.name in new:
            t.CopyFrom(numpy_helper.from_array(np.asarray(new[t.name], np.float32), t.name))
    return out


def inputs_for(proto, count=8, seed=1):
    rng = np.random.default_rng(seed)
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def outputs(proto, samples) -> np.ndarray:
    return np.stack([r[0] for r in run_ort(proto, samples)])


def cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def by_name(result) -> dict[str, dict]:
    return {r["name"]: r for r in result.layers}


# -- magnitude -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_magnitude_zeroes_exactly_the_claimed_fraction_of_smallest_weights(sparsity):
    proto = mlp()
    before = arrays(proto)
    result, out = run_prune(proto, f"magnitude:{sparsity}")
    after = arrays(out)
    for name, node in (("W1", "fc1"), ("W2", "fc2")):
        w0, w1 = before[name], after[name]
        zeros = int(np.sum(w1 == 0))
        assert zeros == round(sparsity * w0.size)
        kept = w1 != 0
        assert np.array_equal(w1[kept], w0[kept])  # nothing else changed
        assert np.abs(w0[~kept]).max() <= np.abs(w0[kept]).min()  # the smallest went
        rec = by_name(result)[node]
        assert rec["zeros"] == [0, zeros] and rec["nonzero"] == [w0.size, w0.size - zeros]
        assert rec["sparsity"] == pytest.approx(zeros / w0.size) and rec["decision"] == "pruned"
    for bias in ("C1", "c2"):
        assert np.array_equal(after[bias], before[bias])
    st = result.stats
    assert st["zeros_after"] == sum(int(np.sum(after[n] == 0)) for n in ("W1", "W2"))
    assert st["params_before"] == st["params_after"]  # dense storage: zeros are still stored
    # ORT runs the pruned graph, and it computes exactly x·W with the zeroed weights.
    samples = inputs_for(proto)
    x = np.stack([s["x"] for s in samples]).astype(np.float64)
    h = np.maximum(x @ after["W1"].T + after["C1"], 0)
    np.testing.assert_allclose(outputs(out, samples), h @ after["W2"] + after["c2"], rtol=1e-4, atol=1e-4)


def test_global_threshold_is_one_threshold_over_all_layers():
    proto = mlp(scale2=10.0)  # W2 ten times larger: a global threshold takes mostly W1
    before = arrays(proto)
    result, out = run_prune(proto, "magnitude:global:0.5")
    after = arrays(out)
    w0 = np.concatenate([before["W1"].ravel(), before["W2"].ravel()])
    w1 = np.concatenate([after["W1"].ravel(), after["W2"].ravel()])
    gone = w1 == 0
    assert int(gone.sum()) == round(0.5 * w0.size)
    t = result.stats["threshold"]
    assert np.abs(w0[gone]).max() == pytest.approx(t) and np.abs(w0[~gone]).min() >= t
    rec = by_name(result)
    assert rec["fc1"]["sparsity"] > 0.6 > 0.5 > rec["fc2"]["sparsity"]  # not the same per layer
    assert result.stats["sparsity"] == pytest.approx(0.5, abs=1e-4)
    # per layer, the same spec zeroes half of each layer
    per_layer, _ = run_prune(proto, "magnitude:0.5")
    assert {r["sparsity"] for r in per_layer.layers} == {0.5}


def test_skip_min_size_and_per_node_overrides():
    proto = cnn()
    result, out = run_prune(proto, "magnitude:0.5,skip=fc,min=300,@conv2=0.8")
    rec = by_name(result)
    assert rec["fc"]["decision"] == "kept (skip)" and rec["fc"]["zeros"] == [0, 0]
    assert rec["conv1"]["decision"] == "kept (below 300 params)"  # 4·8·9 = 288 weights
    assert rec["conv2"]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    w = arrays(out)
    assert not np.any(w["W1"] == 0) and not np.any(w["W3"] == 0)
    assert int(np.sum(w["W2"] == 0)) == round(0.8 * w["W2"].size)
    assert result.stats["layers_pruned"] == 1


# -- N:M -------------------------------------------------------------------------------------------
def _groups(w: np.ndarray, axis: int, m: int) -> np.ndarray:
    moved = np.moveaxis(w, axis, -1)
    return moved.reshape(-1, m)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern_holds_in_every_group_along_the_reduction_axis(n, m):
    proto = cnn(cin=8, c1=8)  # conv1 Cin 8, conv2 Cin 8, fc K 12·16, all multiples of 4 and 8
    before = arrays(proto)
    result, out = run_prune(proto, f"nm:{n}:{m}")
    after = arrays(out)
    # Conv weights group along Cin (axis 1); Gemm transB=1 weights [N, K] along K (axis 1).
    for name in ("W1", "W2", "W3"):
        g0, g1 = _groups(before[name], 1, m), _groups(after[name], 1, m)
        assert np.all(np.count_nonzero(g1, axis=1) == n), name
        top = np.sort(np.abs(g0), axis=1)[:, ::-1]
        np.testing.assert_array_equal(np.sort(np.abs(g1), axis=1)[:, ::-1][:, :n], top[:, :n])
    assert all(r["pattern"] == f"{n}:{m}" and r["sparsity"] == pytest.approx(1 - n / m) for r in result.layers)
    # only the weights changed: ORT on the pruned graph = the original graph with those weights
    samples = inputs_for(proto)
    np.testing.assert_allclose(outputs(out, samples), outputs(with_arrays(proto, after), samples), rtol=1e-6, atol=1e-6)


def test_nm_matmul_groups_along_k_and_leaves_bad_sizes_dense():
    proto = mlp(k=30, h=48)  # fc1's K = 30 is not a multiple of 4
    before = arrays(proto)
    result, out = run_prune(proto, "nm")
    after = arrays(out)
    rec = by_name(result)
    assert rec["fc1"]["decision"].startswith("kept (reduction axis 30")
    assert np.array_equal(after["W1"], before["W1"])
    # MatMul W2 is [K, N]: groups run down the columns (axis 0).
    assert np.all(np.count_nonzero(_groups(after["W2"], 0, 4), axis=1) == 2)
    assert not np.all(np.count_nonzero(_groups(after["W2"], 1, 4), axis=1) == 2)


# -- channel ---------------------------------------------------------------------------------------
def _zero_rows(w: dict[str, np.ndarray], names_axes: dict[str, int], channels) -> dict[str, np.ndarray]:
    out = {k: v.copy() for k, v in w.items()}
    for name, axis in names_axes.items():
        idx = [slice(None)] * out[name].ndim
        idx[axis] = list(channels)
        out[name][tuple(idx)] = 0
    return out


def test_channel_gemm_relu_matmul_shrinks_and_is_exact_for_zero_channels():
    proto = mlp(k=32, h=48, n=16)
    w = arrays(proto)
    dead = [3, 10, 11, 20, 33, 40]  # 6 of 48 hidden units contribute nothing
    proto = with_arrays(proto, _zero_rows(w, {"W1": 0, "C1": 0}, dead))
    result, out = run_prune(proto, "channel:0.125")  # 0.125·48 = 6 channels: exactly the dead ones
    after = arrays(out)
    keep = [i for i in range(48) if i not in dead]
    assert after["W1"].shape == (42, 32) and after["C1"].shape == (42,) and after["W2"].shape == (42, 16)
    np.testing.assert_array_equal(after["W2"], w["W2"][keep])
    (rec,) = [r for r in result.layers if r["decision"] == "pruned"]
    assert rec["name"] == "fc1" and rec["consumer"] == "fc2" and rec["channels"] == [48, 42]
    assert rec["pruned_shape"] == [42, 32] and rec["params"] == [48 * 32 + 48 + 48 * 16, 42 * (32 + 1 + 16)]
    assert result.stats["params_after"] == sum(a.size for a in after.values())
    samples = inputs_for(proto)
    np.testing.assert_allclose(outputs(out, samples), outputs(proto, samples), rtol=1e-5, atol=1e-6)


def test_channel_conv_bn_pool_flatten_gemm_shrinks_every_tensor():
    proto = cnn(cin=4, c1=8, c2=12, hw=8, classes=5)
    w = arrays(proto)
    result, out = run_prune(proto, "channel:0.25")
    after = arrays(out)
    rec = by_name(result)
    assert rec["conv1"]["through"] == "BatchNormalization→Relu" and rec["conv1"]["consumer"] == "conv2"
    assert rec["conv2"]["through"] == "Relu→MaxPool→Flatten" and rec["conv2"]["consumer"] == "fc"
    assert "fc" not in rec  # its output is the model's: no chain starts there
    assert after["W1"].shape == (6, 4, 3, 3) and after["B1"].shape == (6,)
    for p in ("g", "beta", "mean", "var"):
        assert after[p].shape == (6,)
    assert after["W2"].shape == (9, 6, 3, 3) and after["B2"].shape == (9,)
    assert after["W3"].shape == (5, 9 * 16)  # 3 channels × 4x4 pixels left the Gemm
    assert result.stats["channel_rejected"] == {"output of the model": 1}
    assert result.stats["flops_after"] < result.stats["flops_before"]
    # The rewiring is exact: the shrunk graph equals the original with the removed channels'
    # filters, biases and BN shifts zeroed (so they output exactly 0 after BN and Relu).
    keep1 = [int(i) for i in np.flatnonzero(np.isin(w["B1"], after["B1"]))]
    keep2 = [int(i) for i in np.flatnonzero(np.isin(w["B2"], after["B2"]))]
    gone1 = sorted(set(range(8)) - set(keep1))
    gone2 = sorted(set(range(12)) - set(keep2))
    assert len(gone1) == 2 and len(gone2) == 3
    np.testing.assert_array_equal(after["W2"], w["W2"][keep2][:, keep1])
    cols = np.concatenate([np.arange(c * 16, c * 16 + 16) for c in keep2])
    np.testing.assert_array_equal(after["W3"], w["W3"][:, cols])
    masked = _zero_rows(w, {"W1": 0, "B1": 0, "beta": 0, "mean": 0}, gone1)
    masked = _zero_rows(masked, {"W2": 0, "B2": 0}, gone2)
    samples = inputs_for(proto)
    np.testing.assert_allclose(outputs(out, samples), outputs(with_arrays(proto, masked), samples), rtol=1e-5, atol=1e-5)
    # Removing live channels is an approximation: how far from the original, stated.
    assert cosine(outputs(out, samples), outputs(proto, samples)) > 0.8


def test_channel_removes_the_lowest_norm_filters_and_l2_differs():
    proto = mlp(k=32, h=8, n=4)
    w = arrays(proto)
    w1 = w["W1"].copy()
    w1[0] = [0.3] * 32  # L1 9.6, L2 1.7: a wide, flat filter
    w1[1] = [2.0] + [0.0] * 31  # L1 2.0, L2 2.0: one big weight
    w1[2:] *= 3  # the other filters are larger in both norms
    proto = with_arrays(proto, {"W1": w1})
    _, out1 = run_prune(proto, "channel:0.125")  # one channel of 8
    _, out2 = run_prune(proto, "channel:0.125,norm=l2")
    assert not np.any(np.all(arrays(out1)["W1"] == w1[1], axis=1))  # L1 removes filter 1
    assert not np.any(np.all(arrays(out2)["W1"] == w1[0], axis=1))  # L2 removes filter 0


@pytest.mark.parametrize("flatten", ["Reshape-1", "Reshape-explicit"])
def test_channel_through_reshape_to_batch_features(flatten):
    proto = cnn(flatten=flatten)
    result, out = run_prune(proto, "channel:0.5")
    after = arrays(out)
    assert by_name(result)["conv2"]["decision"] == "pruned" and after["W3"].shape == (5, 6 * 16)
    if flatten == "Reshape-explicit":
        assert list(after["shape"]) == [1, 6 * 16]
    ort_outputs = outputs(out, inputs_for(proto))
    assert ort_outputs.shape == (8, 1, 5)


def test_channel_depthwise_chain_of_an_inverted_residual_block():
    proto = inverted_residual(cin=8, expand=24, cout=8)
    w = arrays(proto)
    dead = [1, 5, 6, 12, 13, 20]  # expand filters, and BN shifts that keep them at exactly 0
    masked = _zero_rows(w, {"We": 0, "bn1_b": 0, "bn1_m": 0, "bn2_b": 0, "bn2_m": 0}, dead)
    proto = with_arrays(proto, masked)
    result, out = run_prune(proto, "channel:0.25")  # 6 of 24
    after = arrays(out)
    rec = by_name(result)["expand"]
    assert rec["through"] == "BatchNormalization→Clip→Conv→BatchNormalization→Clip" and rec["consumer"] == "project"
    assert after["We"].shape == (18, 8, 1, 1) and after["Wd"].shape == (18, 1, 3, 3) and after["Wp"].shape == (8, 18, 1, 1)
    for p in ("bn1_g", "bn1_b", "bn1_m", "bn1_v", "bn2_g", "bn2_b", "bn2_m", "bn2_v"):
        assert after[p].shape == (18,), p
    assert after["bn3_g"].shape == (8,)  # the project's own outputs are the residual's: untouched
    group = {a.name: a.i for n in out.graph.node if n.name == "dw" for a in n.attribute}["group"]
    assert group == 18
    samples = inputs_for(proto)
    np.testing.assert_allclose(outputs(out, samples), outputs(proto, samples), rtol=1e-5, atol=1e-5)
    # project → BN → residual Add: the channel dim is read by the Add, so project is left alone
    assert "Add with another tensor (residual?)" in result.stats["channel_rejected"]


def test_channel_leaves_alone_what_something_else_reads():
    rng = np.random.default_rng(0)
    inits = {
        "Wa": rng.standard_normal((8, 4, 3, 3)), "Wb": rng.standard_normal((8, 8, 3, 3)),
        "Wc": rng.standard_normal((8, 16, 1, 1)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "Wa"], ["a"], name="a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"], name="relu"),
        helper.make_node("Conv", ["ar", "Wb"], ["b"], name="b", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["ar", "b"], ["cat"], name="cat", axis=1),  # ar read twice
        helper.make_node("Conv", ["cat", "Wc"], ["y"], name="c"),
    ]
    proto = _model(nodes, inits, (1, 4, 6, 6), (1, 8, 6, 6))
    result, out = run_prune(proto, "channel:0.5")
    assert not result.modified and result.stats["layers_pruned"] == 0
    assert result.stats["channel_rejected"] == {"read by 2 nodes": 1, "Concat in between": 1, "output of the model": 1}
    assert arrays(out)["Wa"].shape == (8, 4, 3, 3)


# -- budgets ---------------------------------------------------------------------------------------
def _calib(proto, count=32, seed=7):
    return inputs_for(proto, count=count, seed=seed)


@pytest.mark.parametrize("spec", ["magnitude:budget:cosine=0.995", "channel:budget:cosine=0.99", "nm:budget:cosine=0.98"])
def test_budget_meets_the_cosine_it_was_given(spec):
    proto = cnn(cin=4, c1=8, c2=16)
    calib = _calib(proto)
    result, out = run_prune(proto, spec, calib)
    st = result.stats
    target = float(spec.rpartition("=")[2])
    # Measured again here, on the calibration samples (all of them: fewer than max_sensitivity).
    ref, got = outputs(proto, calib), outputs(out, calib)
    per_sample = np.mean([cosine(r, g) for r, g in zip(ref, got)])
    assert per_sample >= target and st["calibration_metric"] == pytest.approx(per_sample, abs=1e-5)
    assert st["sensitivity_evaluations"] >= 1 and st["budget"] == f"cosine={target:g}"
    # it pruned something, and less than everything the ladder offered
    assert result.stats["layers_pruned"] >= 1


def test_budget_top1_and_params():
    proto = cnn(cin=4, c1=8, c2=16)
    calib = _calib(proto)
    result, out = run_prune(proto, "magnitude:budget:top1=1.0", calib)
    assert np.array_equal(outputs(out, calib).argmax(-1), outputs(proto, calib).argmax(-1))
    assert result.stats["sparsity"] > 0
    result, out = run_prune(proto, "magnitude:budget:params=3x", calib)
    nonzero = sum(int(np.count_nonzero(a)) for a in arrays(out).values())
    total = sum(a.size for a in arrays(proto).values())
    assert nonzero <= total / 3 and result.stats["params_reached"] == nonzero
    result, out = run_prune(proto, "channel:budget:params=1.5x", calib)
    assert sum(a.size for a in arrays(out).values()) <= total / 1.5


def test_budget_needs_calibration_data():
    with pytest.raises(InputError, match="calibration data"):
        Prune(parse_prune("channel:budget:cosine=0.99"), None)


# -- the spec --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec,expect",
    [
        ("magnitude:0.5", PruneConfig("magnitude", 0.5)),
        ("magnitude:global:0.7", PruneConfig("magnitude", 0.7, scope="global")),
        ("nm", PruneConfig("nm")),
        ("nm:1:4", PruneConfig("nm", n=1, m=4)),
        ("channel:0.3,norm=l2", PruneConfig("channel", 0.3, norm="l2")),
        ("magnitude:budget:cosine=0.99", PruneConfig("magnitude", budget=("cosine", 0.99))),
        ("channel:budget:params=2x", PruneConfig("channel", budget=("params", 2.0))),
        ("nm:2:4:budget:top1=0.98", PruneConfig("nm", budget=("top1", 0.98))),
        (
            "magnitude:0.6,skip=/8/Gemm,skip=a,min=1024,layers=gemm+conv,@/6/Gemm=0.9",
            PruneConfig("magnitude", 0.6, skip=("/8/Gemm", "a"), min_params=1024, layers=("gemm", "conv"),
                        overrides=(("/6/Gemm", 0.9),)),
        ),
    ],
)
def test_spec_grammar_round_trips(spec, expect):
    config = parse_prune(spec)
    assert config == expect
    assert parse_prune(str(config)) == config


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("sparse:0.5", "unknown method 'sparse'"),
        ("magnitude", "needs a sparsity"),
        ("magnitude:1.5", "[0, 1)"),
        ("magnitude:half", "expected METHOD:TARGET"),
        ("channel:global:0.5", "global"),
        ("nm:4:2", "0 < N < M"),
        ("magnitude:budget:flops=2x", "expected METHOD:TARGET"),
        ("magnitude:budget:cosine=1.5", "(0, 1]"),
        ("magnitude:0.5,foo=1", "unknown option 'foo'"),
        ("magnitude:0.5,layers=rnn", "unknown layer kind 'rnn'"),
        ("nm:2:4,@fc=0.5", "skip=NODE"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, needle):
    with pytest.raises(InputError) as err:
        parse_prune(spec)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_prune_runs_after_lowrank_before_the_last_shape():
    ctx = PassContext(prune=parse_prune("nm"))
    assert default_pass_names(ctx) == ["shape", "fold", "dce", "prune", "shape"]


# -- CLI end to end --------------------------------------------------------------------------------
def _cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_channel_prune_digits_end_to_end(capsys, tmp_path):
    out_dir = tmp_path / "ch"
    rc, out, err = _cli(capsys, "build", "--example", "digits", "--prune", "channel:0.25", "-o", out_dir, "--json", "-q")
    assert rc == 0, err
    assert [p["name"] for p in json.loads(out)["passes"]] == ["shape", "fold", "dce", "prune", "shape"]
    m = json.loads((out_dir / "manifest.json").read_text())
    (p,) = [p for p in m["passes"] if p["name"] == "prune"]
    assert p["lossy"] and p["modified"] and p["stats"]["spec"] == "channel:0.25"
    assert p["params"][1] == p["stats"]["params_after"] < p["params"][0] == p["stats"]["params_before"]
    assert {r["name"] for r in p["layers"] if r["decision"] == "pruned"} == {"/0/Conv", "/2/Conv", "/6/Gemm"}
    # the bundle's weights really are smaller: what the manifest lists is what the code runs with
    shapes = sorted(tuple(q["shape"]) for q in m["params"])
    assert (3, 3, 1, 12) in shapes and (3, 3, 12, 24) in shapes  # conv weights stored HWIO (NHWC host code)
    assert sum(int(np.prod(s)) for s in shapes) == p["params"][1]
    assert m["verification"]["numerics"]["ok"]
    assert m["verification"]["evaluation"]["compiled_accuracy"] > 0.9


def test_cli_magnitude_prune_zeroes_the_bundle_weights(capsys, tmp_path):
    out_dir = tmp_path / "mag"
    rc, _, err = _cli(capsys, "build", "--example", "digits", "--prune", "magnitude:0.5", "--accuracy-cosine", "0.9",
                      "-o", out_dir, "-q")
    assert rc == 0, err
    m = json.loads((out_dir / "manifest.json").read_text())
    (p,) = [p for p in m["passes"] if p["name"] == "prune"]
    assert p["stats"]["zeros_after"] == p["stats"]["layer_weights"] // 2
    with np.load(out_dir / "weights.npz") as w:
        zeros = sum(int(np.sum(w[k] == 0)) for k in w.files)
    assert zeros >= p["stats"]["zeros_after"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--prune", "magnitude:2"], "--prune 'magnitude:2'"),
        (["--prune", "channel:0.5,bogus=1"], "unknown option 'bogus'"),
        (["--passes", "shape,prune"], "needs a spec"),
    ],
)
def test_cli_bad_prune_specs_exit_2_with_one_line(capsys, tmp_path, args, needle):
    rc, _, err = _cli(capsys, "build", "--example", "digits", "-q", "-o", tmp_path / "o", *args)
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
