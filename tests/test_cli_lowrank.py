"""Low-rank through the CLI, the Python API and a config file, end to end on the example."""

from __future__ import annotations

import json

import numpy as np
import pytest

import edgecomp
from edgecomp.cli import main
from edgecomp.examples import get_example


def _run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_digits_budget_halves_params_within_one_point(capsys, tmp_path):
    """The issue's target: digits-cnn ≥ 2× fewer parameters at ≤ 1 point accuracy loss."""
    out_dir = tmp_path / "lr"
    rc, out, err = _run(capsys, "build", "--example", "digits", "--target", "host", "-o", out_dir,
                        "--lowrank", "budget:params=2x", "--json", "-q")
    assert rc == 0, err
    doc = json.loads(out)
    assert [p["name"] for p in doc["passes"]] == ["shape", "fold", "dce", "lowrank", "shape"]
    m = json.loads((out_dir / "manifest.json").read_text())
    (lr,) = [p for p in m["passes"] if p["name"] == "lowrank"]
    assert lr["lossy"] and lr["params"][0] / lr["params"][1] >= 2.0
    assert lr["stats"]["data_aware"] and lr["stats"]["layers_factorized"] >= 1
    ev = m["verification"]["evaluation"]
    assert ev["ort_accuracy"] - ev["compiled_accuracy"] <= 0.01
    # The compiled code reproduces the factorized graph exactly; the bundle runs and agrees.
    assert m["verification"]["numerics"]["ok"]
    x, y = get_example("digits").split("test")
    logits = edgecomp.run_bundle(out_dir, {"input": x[:, None]})["logits"][:, 0]
    assert np.mean(logits.argmax(1) == y) == pytest.approx(ev["compiled_accuracy"])
    assert "whitened-svd" in (out_dir / "report.md").read_text()


def test_config_file_equals_flags(capsys, tmp_path):
    cfg = tmp_path / "build.toml"
    cfg.write_text('[build]\nexample = "digits"\ntarget = "host"\nlowrank = "ratio:0.25"\nlowrank-layers = "gemm"\nquiet = true\n')
    rc, _, err = _run(capsys, "build", "--config", cfg, "-o", tmp_path / "a")
    assert rc == 0, err
    rc, _, err = _run(capsys, "build", "--example", "digits", "--target", "host", "--lowrank", "ratio:0.25",
                      "--lowrank-layers", "gemm", "-q", "-o", tmp_path / "b")
    assert rc == 0, err
    a = json.loads((tmp_path / "a" / "manifest.json").read_text())
    b = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert a["passes"][3]["layers"] == b["passes"][3]["layers"]
    assert a["files"]["weights.npz"]["sha256"] == b["files"]["weights.npz"]["sha256"]


def test_python_api_takes_a_policy_string(tmp_path):
    r = edgecomp.build(example="digits", target="host", output=tmp_path / "p", lowrank="rank:16")
    (lr,) = [p for p in r.manifest["passes"] if p["name"] == "lowrank"]
    assert {layer["rank"] for layer in lr["layers"] if layer["decision"] == "factorized"} == {16}


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--lowrank", "svd:3"], "--lowrank 'svd:3'"),
        (["--lowrank", "erank", "--lowrank-layers", "gemm,rnn"], "unknown low-rank layer kind 'rnn'"),
        (["--lowrank", "budget:params=2x", "--passes", "lowrank"], None),  # works: example calib split
        (["--passes", "lowrank"], "needs a rank policy"),
    ],
)
def test_lowrank_option_errors(capsys, tmp_path, args, needle):
    rc, _, err = _run(capsys, "build", "--example", "digits", "--target", "host", "-q", "-o", tmp_path / "o", *args)
    if needle is None:
        assert rc == 0, err
        return
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_bad_config_file_is_one_line(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[build]\nlowrnak = 'erank'\n")
    rc, _, err = _run(capsys, "build", "--config", cfg)
    assert rc == 2 and "unknown build option 'lowrnak'" in err and len(err.strip().splitlines()) == 1
    cfg.write_text("[build\n")
    rc, _, err = _run(capsys, "build", "--config", cfg)
    assert rc == 2 and "not valid TOML" in err
    rc, _, err = _run(capsys, "build", "--config", tmp_path / "missing.toml")
    assert rc == 2 and "config file not found" in err


def test_budget_without_calibration_is_refused(tmp_path):
    from onnx import save

    model = tmp_path / "m.onnx"
    save(__import__("onnx").load(str(get_example("digits").model_path)), model)
    with pytest.raises(edgecomp.InputError, match="needs calibration data"):
        edgecomp.build(model, target="host", output=tmp_path / "o", input_shapes={"input": (1, 1, 8, 8)},
                       lowrank="budget:params=2x")


def test_lossy_pass_past_the_accuracy_budget_stops_the_build(capsys, tmp_path):
    rc, _, err = _run(capsys, "build", "--example", "digits", "--target", "host", "-q", "-o", tmp_path / "o",
                      "--lowrank", "rank:2", "--accuracy-cosine", "0.99")
    assert rc == 1
    assert "pass 'lowrank' took the model past the accuracy budget: logits: cosine" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
