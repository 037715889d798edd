"""Factorized torch layers (edgecomp/train/layers.py) and ``factorize`` (edgecomp/train/factorize.py),
held to the low-rank graph passes they mirror.

The reference is always the pass run on the ONNX that torch exports for the *dense* layer: the
factorized torch layer must export to the same op chain (Constant nodes aside: the TorchScript
exporter writes shapes as Constant nodes, the pass as initializers), with the same numbers, and
report the same error. Tolerances: float32 round-off of a chain of 2-4 small products is ~1e-6 of
the output scale (O(1) here), so "equal" means max |diff| ≤ 1e-5; errors agree to 1e-5.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from helpers import need_torch  # noqa: E402

torch = need_torch()
from torch import nn  # noqa: E402

import edgecomp  # noqa: E402
from edgecomp.errors import InputError  # noqa: E402
from edgecomp.examples import get_example  # noqa: E402
from edgecomp.numerics import run_ort  # noqa: E402
from edgecomp.passes import lowrank_conv, lowrank_gemm, tensor_train  # noqa: E402,F401  (register factorizers)
from edgecomp.passes.lowrank import LowRank, LowRankConfig  # noqa: E402
from edgecomp.passes.rank_selection import parse_policy  # noqa: E402
from edgecomp.train.data import trained_digits_model  # noqa: E402
from edgecomp.train.factorize import factorize  # noqa: E402
from edgecomp.train.layers import (  # noqa: E402
    CPConv2d, LowRankLinear, SpatialConv2d, SVDConv2d, TTLinear, Tucker2Conv2d, conv_decomposition,
)

torch.set_num_threads(1)
TOL = 1e-5

# name: (dense layer, input shape, pass factorizer, conv method, torch factorized-layer builder, truncated rank)
CASES = {
    "linear": (lambda: nn.Linear(40, 24), (4, 40), "gemm", "tucker2", LowRankLinear.from_linear, 6),
    "tt": (lambda: nn.Linear(64, 81), (4, 64), "tt", "tucker2", TTLinear.from_linear, 4),
    "svd1x1": (lambda: nn.Conv2d(24, 16, 1, stride=2, padding=1), (2, 24, 7, 7), "conv", "tucker2", SVDConv2d.from_conv, 6),
    "spatial": (lambda: nn.Conv2d(12, 20, (3, 5), padding=(1, 2), dilation=(1, 2)), (2, 12, 9, 10), "conv", "spatial",
                SpatialConv2d.from_conv, 5),
    "tucker2": (lambda: nn.Conv2d(12, 20, 3, stride=2, padding=1), (2, 12, 9, 10), "conv", "tucker2", Tucker2Conv2d.from_conv, 10),
    "cp": (lambda: nn.Conv2d(12, 20, 3, padding=1), (2, 12, 9, 10), "conv", "cp", CPConv2d.from_conv, 6),
}


# -- helpers --------------------------------------------------------------------------------------
def export(module: nn.Module, shape) -> onnx.ModelProto:
    """tools/train_digits.py's export (classic exporter, opset 17), at a fixed input shape."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(shape),), buf, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
    return onnx.load_from_string(buf.getvalue())


def ops(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node if n.op_type != "Constant"]


def ort(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return run_ort(proto, [{"x": x}])[0][0]


def run_pass(proto: onnx.ModelProto, kind: str, method: str, rank: int, calib=None):
    """The low-rank pass on ``proto``'s single layer at ``rank``: (rewritten proto, its record)."""
    node = next(n for n in proto.graph.node if n.op_type in ("Gemm", "MatMul", "Conv"))
    config = LowRankConfig(policy=parse_policy(f"ranks:{node.name}={rank}"), layers=(kind,), conv_method=method, min_params=0)
    result = LowRank(config, calib=calib)(ir.serde.deserialize_model(proto))
    (record,) = result.layers
    return ir.serde.serialize_model(result.model), record


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm((a - b).double()) / torch.linalg.norm(b.double()))


def cp_conv(cout: int, cin: int, rank: int) -> nn.Conv2d:
    """A 3x3 conv whose weight has CP rank ``rank`` (CP-ALS is exact only on such weights)."""
    g = torch.Generator().manual_seed(0)
    f = [torch.randn(d, rank, generator=g) for d in (cout, cin, 3, 3)]
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("ar,br,cr,dr->abcd", *f) / 8)
    return conv


trained_digits = trained_digits_model


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


# -- the layers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_full_rank_equals_the_dense_layer(case):
    make, shape, _, method, build, _ = CASES[case]
    torch.manual_seed(0)
    dense = cp_conv(20, 12, 4) if case == "cp" else make()
    if case in ("linear", "tt"):
        full = min(dense.in_features, dense.out_features) if case == "linear" else 10**6
    else:
        full = 4 if case == "cp" else conv_decomposition(dense, method).full_rank
    layer = build(dense, full)
    x = torch.randn(shape)
    with torch.no_grad():
        assert (layer(x) - dense(x)).abs().max() <= TOL
        assert (layer.dense_weight() - dense.weight).abs().max() <= TOL
    if case == "tt":  # leading dims beyond a batch survive the reshape chain
        x3 = torch.randn(2, 3, 64)
        with torch.no_grad():
            assert (layer(x3) - dense(x3)).abs().max() <= TOL


def test_low_rank_linear_from_factors():
    a, b, bias = torch.randn(3, 10), torch.randn(7, 3), torch.randn(7)
    layer = LowRankLinear.from_factors(a, b, bias)
    assert (layer.first.weight.shape, layer.second.weight.shape) == ((3, 10), (7, 3))
    assert layer.first.bias is None and layer.num_params() == 30 + 21 + 7
    x = torch.randn(5, 10)
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ a.T @ b.T + bias, atol=TOL)
        assert torch.allclose(layer.dense_weight(), b @ a)
    with pytest.raises(ValueError):
        LowRankLinear.from_factors(a, torch.randn(7, 4))


@pytest.mark.parametrize("case", list(CASES))
def test_truncated_layer_is_the_pass_rewrite(case):
    """Same op chain, same outputs and same error as the pass on the exported dense layer."""
    make, shape, kind, method, build, rank = CASES[case]
    torch.manual_seed(1)
    dense = make()
    layer = build(dense, rank)
    rewritten, record = run_pass(export(dense, shape), kind, method, rank)
    assert record["decision"] == "factorized"
    mine = export(layer, shape)
    assert ops(mine) == ops(rewritten), (ops(mine), ops(rewritten))
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    ref, got = ort(rewritten, x), ort(mine, x)
    assert np.max(np.abs(got - ref)) <= TOL * max(1.0, np.max(np.abs(ref)))
    with torch.no_grad():
        assert np.max(np.abs(layer(torch.from_numpy(x)).numpy() - got)) <= TOL
        assert rel(layer.dense_weight(), dense.weight) == pytest.approx(record["error"], abs=TOL)
    assert record["params"][1] == layer.num_params()
    assert record["error"] > 0.05  # truncated for real: the check above is not 0 == 0


def test_data_aware_linear_is_the_passes_whitened_svd():
    torch.manual_seed(3)
    dense = nn.Linear(40, 24)
    scale = torch.logspace(0, -2, 40)  # anisotropic inputs: whitening changes the factors
    xs = torch.randn(16, 4, 40) * scale
    rows = xs.reshape(-1, 40).double()
    layer = LowRankLinear.from_linear(dense, 6, moment=rows.T @ rows / len(rows), rows=len(rows))
    calib = [{"x": x.numpy()} for x in xs]
    rewritten, record = run_pass(export(dense, (4, 40)), "gemm", "tucker2", 6, calib=calib)
    assert record["method"] == "whitened-svd"
    x = xs[0].numpy()
    assert np.max(np.abs(ort(export(layer, (4, 40)), x) - ort(rewritten, x))) <= TOL
    # the pass's error is the output error on the calibration rows
    with torch.no_grad():
        y, y_r = dense(xs) - dense.bias, layer(xs) - dense.bias
    assert rel(y_r, y) == pytest.approx(record["error"], rel=1e-3)
    plain = LowRankLinear.from_linear(dense, 6)
    with torch.no_grad():
        assert rel(plain(xs) - dense.bias, y) > 1.5 * rel(y_r, y)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_conv_layers_keep_the_geometry_and_check_the_pass_layout():
    conv = nn.Conv2d(8, 12, 3, stride=(2, 1), padding="valid", dilation=(1, 2))
    layer = Tucker2Conv2d.from_conv(conv, 12)
    core = layer.convs[1]
    assert (core.stride, core.padding, core.dilation) == ((2, 1), (0, 0), (1, 2))
    assert all(c.stride == (1, 1) and c.padding == (0, 0) for c in (layer.convs[0], layer.convs[2]))
    x = torch.randn(1, 8, 11, 12)
    with torch.no_grad():
        assert (layer(x) - conv(x)).abs().max() <= TOL
    # torch's padding="same" with an even kernel pads one more at the end: a ZeroPad2d in front
    even = nn.Conv2d(6, 6, (2, 4), padding="same")
    spatial = SpatialConv2d.from_conv(even, 100)
    with torch.no_grad():
        assert (spatial(x[:, :6]) - even(x[:, :6])).abs().max() <= TOL
    with pytest.raises(ValueError, match="svd"):
        Tucker2Conv2d.from_conv(nn.Conv2d(8, 8, 1), 4)  # the pass decomposes 1x1 convs by SVD
    with pytest.raises(ValueError, match="grouped"):
        CPConv2d.from_conv(nn.Conv2d(8, 8, 3, groups=8), 4)


def test_exported_network_builds_and_matches_ort(tmp_path):
    torch.manual_seed(4)
    net = nn.Sequential(
        Tucker2Conv2d.from_conv(nn.Conv2d(4, 16, 3, padding=1), 8), nn.ReLU(),
        CPConv2d.from_conv(nn.Conv2d(16, 16, 3, padding=1), 6), nn.ReLU(),
        SpatialConv2d.from_conv(nn.Conv2d(16, 16, 3, padding=1, stride=2), 6), nn.ReLU(),
        SVDConv2d.from_conv(nn.Conv2d(16, 8, 1), 4), nn.Flatten(),
        LowRankLinear.from_linear(nn.Linear(72, 64), 8), nn.ReLU(),
        TTLinear.from_linear(nn.Linear(64, 81), 4),
    ).eval()
    proto = export(net, (1, 4, 6, 6))
    onnx.save(proto, tmp_path / "net.onnx")
    result = edgecomp.build(tmp_path / "net.onnx", target="host", output=tmp_path / "bundle")
    assert result.verification["numerics"]["ok"]
    xs = np.random.default_rng(5).standard_normal((3, 1, 4, 6, 6)).astype(np.float32)  # not the build's inputs
    got = edgecomp.run_bundle(result.path, {"x": xs})["y"]
    ref = np.stack([ort(proto, x) for x in xs])
    assert got.shape == ref.shape == (3, 1, 81)
    assert np.max(np.abs(got - ref)) <= TOL * max(1.0, np.max(np.abs(ref)))
    with torch.no_grad():
        assert np.max(np.abs(net(torch.from_numpy(xs[0])).numpy() - ref[0])) <= TOL


# -- factorize ------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy,calibrated", [("erank", False), ("erank", True), ("budget:params=2x", True)])
def test_factorize_digits_is_the_pass(policy, calibrated):
    """Same ranks, methods, params, MACs, errors and decisions as the pass on the shipped ONNX;
    fewer params; test accuracy within 2 points (7 of 360 images) of the dense model."""
    ex = get_example("digits")
    x_test, y_test = ex.split("test")
    x_cal, _ = ex.split("calib")
    model = trained_digits()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = torch.from_numpy(x_cal) if calibrated else None
    new, records = factorize(model, policy, calib=calib)

    samples = [{"input": x_cal[i:i + 1]} for i in range(len(x_cal))] if calibrated else None
    result = LowRank(LowRankConfig(policy=parse_policy(policy)), calib=samples)(
        ir.serde.deserialize_model(onnx.load(str(ex.model_path))))
    theirs = {r["name"]: r for r in result.layers}
    for mine in records:
        ref = theirs[f"/{mine['name']}/{'Conv' if mine['kind'] == 'conv' else 'Gemm'}"]
        assert mine["decision"] == ref["decision"]
        if ref["decision"] == "factorized":
            assert (mine["method"], mine["rank"], mine["params"]) == (ref["method"], ref["rank"], ref["params"])
            assert mine["error"] == pytest.approx(ref["error"], abs=1e-6)
            if calibrated:  # per sample, as the pass counts the batch-1 example
                assert mine["macs"] == ref["macs"]
        elif ref["rank"] is not None:
            assert mine["rank"] == ref["rank"]
    assert sum(r["decision"] == "factorized" for r in records) >= 1

    dense_params = sum(p.numel() for p in model.parameters())
    new_params = sum(p.numel() for p in new.parameters())
    saved = sum(r["params"][0] - r["params"][1] for r in records)
    assert new_params == dense_params - saved and saved > 0
    if policy.startswith("budget"):
        assert new_params <= dense_params / 2
    assert accuracy(new, x_test, y_test) >= accuracy(model, x_test, y_test) - 0.02
    # the input is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model[6]) is nn.Linear and type(new[6]) is LowRankLinear


def test_factorize_leaves_the_input_and_its_batchnorm_alone():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 1))
    model.train()
    stats = copy.deepcopy(model[1].state_dict())
    new, records = factorize(model, "rank:8", calib=torch.randn(4, 8, 6, 6) * 3 + 1)
    assert all(torch.equal(stats[k], v) for k, v in model[1].state_dict().items())
    assert torch.equal(new[1].running_mean, stats["running_mean"])
    assert model.training and new.training and new[0].training and new[3].training
    assert [r["method"] for r in records] == ["tucker2", "whitened-svd"]
    assert isinstance(new[0], Tucker2Conv2d) and isinstance(new[3], SVDConv2d)
    assert records[0]["macs"] == [8 * 32 * 9 * 36, records[0]["macs"][1]] and records[0]["macs"][1] < records[0]["macs"][0]


def test_factorize_keeps_what_the_pass_keeps():
    torch.manual_seed(7)
    shared = nn.Linear(64, 64)
    model = nn.Sequential(
        nn.Conv2d(16, 16, 3, groups=16), nn.Conv2d(16, 32, 3, groups=2), nn.Conv2d(16, 32, 3, padding_mode="reflect", padding=1),
        nn.Flatten(), shared, nn.ReLU(), shared, nn.Linear(64, 48), nn.Linear(48, 64),
    )
    tied = nn.Linear(64, 64)
    model.append(tied)
    model.append(nn.Linear(64, 64))
    model[-1].weight = tied.weight
    new, records = factorize(model, "rank:4", min_params=0)
    decisions = {r["name"]: r["decision"] for r in records}
    assert decisions["0"] == "kept dense (depthwise conv)" and decisions["1"] == "kept dense (grouped conv)"
    assert decisions["2"] == "kept dense (padding_mode reflect)"
    assert decisions["9"] == decisions["10"] == "kept dense (tied weight)"
    assert decisions["4"] == decisions["7"] == decisions["8"] == "factorized" and "6" not in decisions
    assert new[6] is new[4] and isinstance(new[4], LowRankLinear)  # a module used twice is one layer, replaced at both
    # factorizing again never reaches inside a factorized layer
    again, records2 = factorize(new, "rank:2", min_params=0)
    assert {r["name"] for r in records2} == {"0", "1", "2", "9", "10"}
    assert again[4] is not new[4] and torch.equal(again[4].first.weight, new[4].first.weight)


def test_factorize_max_layer_error_and_kinds():
    model = trained_digits()
    _, records = factorize(model, "energy:0.9", max_layer_error=0.35)
    decisions = {r["name"]: r["decision"] for r in records}
    assert decisions["2"].startswith("kept dense (error 0.41") and decisions["6"] == "factorized"
    new, records = factorize(model, "rank:4", layers=("tt",), min_params=0)
    by_name = {r["name"]: r for r in records}
    assert by_name["6"]["kind"] == "tt" and isinstance(new[6], TTLinear)  # 512x64 = (8,8,8)x(4,4,4)
    assert by_name["8"]["decision"].startswith("kept dense (64x10 does not factor")
    new, records = factorize(model, "rank:4", layers=("linear", "tt"), min_params=0)
    assert isinstance(new[6], TTLinear) and isinstance(new[8], LowRankLinear)  # SVD where TT cannot
    _, records = factorize(model, "ratio:0.5", layers="conv", conv_method="cp")
    assert [(r["name"], r["method"], r["decision"]) for r in records] == [
        ("0", "cp", "kept dense (below 1024 params)"), ("2", "cp", "factorized")]


@pytest.mark.parametrize("kwargs", [
    {"policy": "bogus"}, {"policy": "erank:-1"}, {"policy": "energy:2"}, {"policy": ""}, {"policy": 3},
    {"policy": "erank", "layers": ("lstm",)}, {"policy": "erank", "conv_method": "svd2"},
    {"policy": "budget:params=2x"},  # a global budget needs calibration data
])
def test_bad_arguments_are_one_line_input_errors(kwargs):
    with pytest.raises(InputError) as err:
        factorize(nn.Sequential(nn.Linear(64, 64)), **kwargs)
    assert "\n" not in str(err.value) and str(err.value).startswith("factorize: ")
