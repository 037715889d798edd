"""Compression-aware training (edgecomp.train.regularize / compress_aware / common): the
SVD-parametrised layers equal their dense twins, the penalties' gradients match finite
differences, each regularizer really lowers the spectrum it targets, truncation meets its budget
and exports to a model that edgecomp builds and ONNX Runtime agrees with, and the training loop
runs unchanged under torchrun (DDP, 2 ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import onnxruntime as ort
import pytest

from helpers import need_torch

torch = need_torch()
from torch import nn  # noqa: E402

import edgecomp  # noqa: E402
from edgecomp.errors import InputError  # noqa: E402
from edgecomp.passes.rank_selection import effective_rank as pass_effective_rank  # noqa: E402
from edgecomp.train import regularize as R  # noqa: E402
from edgecomp.train.common import TrainLog, fit  # noqa: E402
from edgecomp.train.compress_aware import Recipe, accuracy, as_tensors, export_onnx, train_compressed  # noqa: E402
from edgecomp.train.data import load_digits_splits, trained_digits_model  # noqa: E402
from edgecomp.train.layers import LowRankLinear  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    sp = load_digits_splits()
    return as_tensors(*sp["train"]), as_tensors(*sp["test"]), sp


def test_svd_layers_equal_their_dense_twins():
    torch.manual_seed(0)
    lin = nn.Linear(12, 7)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1)
    x = torch.randn(4, 12)
    img = torch.randn(2, 3, 9, 9)
    assert torch.allclose(R.SVDParamLinear(lin)(x), lin(x), atol=1e-5)
    assert torch.allclose(R.SVDParamConv2d(conv)(img), conv(img), atol=1e-5)
    assert torch.allclose(R.SVDParamLinear(lin).matrix(), lin.weight, atol=1e-5)
    with pytest.raises(InputError, match="groups=3"):
        R.SVDParamConv2d(nn.Conv2d(3, 3, 3, groups=3))


@pytest.mark.parametrize("fn", [R.nuclear, R.hoyer, R.entropy])
def test_penalty_gradients_match_finite_differences(fn):
    s = (torch.rand(9, dtype=torch.float64) + 0.05).requires_grad_()
    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-5)
    w = torch.randn(6, 9, dtype=torch.float64).requires_grad_()  # the dense parametrisation (svdvals)
    assert torch.autograd.gradcheck(lambda m: fn(torch.linalg.svdvals(m)), (w,), eps=1e-6, atol=1e-5)


def test_orthogonality_gradient_and_zero_at_orthonormal_factors():
    layer = R.SVDParamLinear(nn.Linear(8, 5)).double()
    assert float(R.orthogonality(layer).detach()) < 1e-10  # U, V from an SVD are orthonormal
    u = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(R.orthogonality_of, (u, v), eps=1e-6, atol=1e-5)


def test_entropy_is_the_log_of_the_passes_effective_rank():
    s = np.array([5.0, 3.0, 1.0, 0.5, 0.01])
    assert R.effective_rank(torch.tensor(s)) == pytest.approx(pass_effective_rank(s), rel=1e-6)
    assert R.effective_rank(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["erank", "l1", "hoyer", "nuclear"])
def test_each_regularizer_lowers_the_effective_rank_of_the_layers_it_acts_on(kind, digits):
    """From the trained digits model, same seed, same 2 epochs: the regularized run ends with a
    clearly lower effective rank of fc1 than the unregularized one (the regularizers do what they
    claim; from a random init the entropy's gradient starts near zero: a flat spectrum is its
    maximum)."""
    train, _, _ = digits

    def run(k: str, lam: float) -> float:
        torch.manual_seed(0)
        reg = R.Regularizer(k, lam, skip=("0", "8"))
        net = trained_digits_model()
        if reg.parametrisation == "svd":
            net = R.svd_parametrize(net, skip=("0", "8"))
        fit(net, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), train, epochs=2, lr=1e-2, regularizer=reg,
            log=TrainLog(enabled=False))
        return R.effective_rank(R.singular_values(dict(net.named_modules())["6"]).detach())

    assert run(kind, 3.0) < 0.8 * run("none", 0.0)


def test_budget_truncation_meets_the_budget_and_keeps_the_largest_terms():
    torch.manual_seed(0)
    model = R.svd_parametrize(nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20)))
    with torch.no_grad():  # layer 0: a fast-decaying spectrum; layer 2: flat
        model[0].s.copy_(torch.logspace(0, -4, 30))
        model[2].s.fill_(1.0)
    ranks = R.ranks_for_budget(model, 1500)
    thin = R.truncate(model, ranks)
    assert sum(p.numel() for p in thin.parameters()) <= 1500
    assert ranks["0"] < ranks["2"]  # the energy sits in few directions of layer 0
    assert isinstance(thin[0], LowRankLinear) and thin[0].first.out_features == ranks["0"]
    # at full rank (or where factors would not pay) truncation is exact
    full = R.truncate(model, {"0": 30, "2": 20})
    x = torch.randn(5, 40)
    assert torch.allclose(full(x), model(x), atol=1e-5)
    assert isinstance(full[2], nn.Linear)  # 20·(30+20) ≥ 30·20: the dense matrix is smaller
    with pytest.raises(InputError, match="below the model's minimum"):
        R.ranks_for_budget(model, 10)
    with pytest.raises(InputError, match="no SVD-parametrised layer named 'nope'"):
        R.truncate(model, {"nope": 1})


def test_bad_regularizer_arguments_are_one_line_errors():
    with pytest.raises(InputError, match="unknown regularizer 'l2'"):
        R.Regularizer("l2", 1.0)
    with pytest.raises(InputError, match="finite number >= 0"):
        R.Regularizer("erank", -1.0)


def test_compression_aware_digits_exports_builds_and_matches_ort(tmp_path, digits):
    """A short erank run from the trained model, truncated to 6000 params: the thin model keeps most of its accuracy,
    exports to the low-rank pass's MatMul→Gemm form, and the edgecomp bundle agrees with ORT."""
    train, test, sp = digits
    torch.manual_seed(0)
    recipe = Recipe(kind="erank", strength=1.0, epochs=6, budget=6000, finetune_epochs=4, skip=("0", "8"))
    thin, rec = train_compressed(trained_digits_model(), train, test, recipe, seed=0)
    assert rec["params"] <= 6000 < rec["params_dense"]
    assert accuracy(thin, *test) > 0.9  # 15 % of the dense params, 10 short epochs from the trained model
    path = tmp_path / "thin.onnx"
    export_onnx(thin, torch.zeros(1, 1, 8, 8), path)
    import onnx

    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMul") == 1 and ops.count("Gemm") == 2  # fc1 as MatMul(x, A) → Gemm
    x = sp["test"][0][:16]
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        assert np.abs(thin(torch.from_numpy(x)).numpy() - want).max() < 1e-4
    result = edgecomp.build(path, target="host", output=tmp_path / "b", input_shapes={"input": (1, 1, 8, 8)})
    got = edgecomp.run_bundle(result.path, {"input": x[:, None]})["logits"][:, 0]
    assert np.abs(got - want).max() < 1e-4


def test_lossy_pass_checked_on_random_inputs_says_so(tmp_path, digits):
    """With no --reference-inputs a lossy pass is judged on random inputs; when that fails the
    error says so and how to give real ones."""
    _, _, sp = digits
    path = tmp_path / "digits.onnx"
    export_onnx(trained_digits_model(), torch.zeros(1, 1, 8, 8), path)
    np.savez(tmp_path / "calib.npz", input=sp["calib"][0][:, None])
    with pytest.raises(edgecomp.NumericsError) as err:
        edgecomp.build(path, target="host", output=tmp_path / "b", input_shapes={"input": (1, 1, 8, 8)},
                       lowrank="rank:1", calib=tmp_path / "calib.npz")
    assert "checked on random inputs: give real ones with --reference-inputs NPZ" in str(err.value)


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    from torch import nn
    from edgecomp.train.common import TrainLog, dist_info, fit
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(64, 6); y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    recs = fit(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), (x, y), epochs=4, batch_size=8,
               lr=1e-2, log=TrainLog(name="ddp", path=os.path.join(sys.argv[1], "epochs.jsonl")))
    info = dist_info()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
    json.dump({"rank": info.rank, "world": info.world, "params": flat, "losses": [r["loss"] for r in recs]},
              open(os.path.join(sys.argv[1], f"rank{info.rank}.json"), "w"))
""")


def test_fit_runs_unchanged_under_torchrun(tmp_path):
    """Two DDP ranks (gloo): every rank ends with the same parameters, the logged loss is the
    ranks' mean and it falls, and only rank 0 prints the per-epoch log."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), str(tmp_path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180, env=env)
    if proc.returncode != 0 and "SIGABRT" in proc.stderr:
        # A rank died of SIGABRT in about 1 of 30 runs on a loaded 2-core machine (gloo; the
        # rank's own message was not captured then: the assert below now shows it). One retry;
        # the results are checked all the same, and a second failure fails.
        warnings.warn("torchrun run died of SIGABRT once; retried: " + proc.stderr[:500])
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, "\n".join(  # the ranks' own messages, then torchrun's summary
        [line for line in proc.stderr.splitlines() if "ddp epoch" not in line][:40]) + "\n...\n" + proc.stderr[-1200:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert (r0["world"], r1["world"]) == (2, 2)
    assert np.allclose(r0["params"], r1["params"], atol=1e-6)
    assert r0["losses"] == r1["losses"] and r0["losses"][-1] < r0["losses"][0]
    assert proc.stderr.count("ddp epoch 4:") == 1
    lines = (tmp_path / "epochs.jsonl").read_text().splitlines()  # written by rank 0 only
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]


def test_train_log_writes_its_jsonl_even_when_quiet(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("from an earlier run\n")
    log = TrainLog(name="quiet", path=path, enabled=False)
    log.epoch(1, loss=0.5, erank={"fc1": 3.25})
    log.epoch(2, loss=0.25)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"epoch": 1, "loss": 0.5, "erank": {"fc1": 3.25}}, {"epoch": 2, "loss": 0.25}]
