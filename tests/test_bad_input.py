"""Bad input never crashes: one ``edgecomp: error:`` line, exit 2, inputs untouched, nothing left behind.

The CLI runs in-process (``edgecomp.cli.main``) because importing TVM in a fresh process is slow;
one test runs ``python -m edgecomp`` in a subprocess to prove the module entry point behaves too.
Most tests pass ``-q`` so that the progress display stays out of stderr (see
``test_default_progress_keeps_error_to_one_line`` for the same rule without ``-q``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import assert_bad_input, digits_example, make_model, matmul_model, relu_model, save, sha256, staging_leftovers, tree_digest



@pytest.fixture
def relu_file(tmp_path) -> Path:
    return save(relu_model(), tmp_path / "relu.onnx")


# --- 1-4: files that are not (complete) ONNX models ----------------------------------------------


@pytest.mark.parametrize("command", ["build", "inspect"])
def test_missing_model_file(cli, tmp_path, command):
    model = tmp_path / "no_such_model.onnx"
    out = tmp_path / "out"
    extra = ["-o", out] if command == "build" else []
    rc, _, err = cli(command, model, *extra)
    msg = assert_bad_input(rc, err, mentions=["no_such_model.onnx", "not found"], output=out)
    assert not model.exists()
    assert msg


def test_directory_as_model(cli, tmp_path):
    folder = tmp_path / "a_folder.onnx"
    folder.mkdir()
    (folder / "inside.txt").write_text("keep me")
    before = tree_digest(folder)
    out = tmp_path / "out"
    rc, _, err = cli("build", folder, "-o", out)
    assert_bad_input(rc, err, mentions=["a_folder.onnx", "directory"], output=out)
    assert tree_digest(folder) == before


NOT_ONNX = {
    "text": b"this is a README, not a neural network\n" * 10,
    "json": b'{"model": "resnet", "layers": 50}\n',
    "random": np.random.default_rng(0).bytes(4096),
    "empty": b"",
    "tensor_proto": numpy_helper.from_array(np.ones((3, 4), np.float32), "t").SerializeToString(),
}


@pytest.mark.parametrize("kind", sorted(NOT_ONNX))
@pytest.mark.parametrize("command", ["build", "inspect"])
def test_not_an_onnx_file(cli, tmp_path, kind, command):
    model = tmp_path / f"not_a_model_{kind}.onnx"
    model.write_bytes(NOT_ONNX[kind])
    digest = sha256(model)
    out = tmp_path / "out"
    extra = ["-o", out] if command == "build" else []
    rc, _, err = cli(command, model, *extra)
    assert_bad_input(rc, err, mentions=[model.name], inputs={model: digest}, output=out)


def test_truncated_onnx(cli, tmp_path):
    full = digits_example().model_path.read_bytes()
    model = tmp_path / "digits_truncated.onnx"
    model.write_bytes(full[: len(full) // 2])
    digest = sha256(model)
    out = tmp_path / "out"
    rc, _, err = cli("build", model, "--target", "host", "-o", out)
    msg = assert_bad_input(rc, err, mentions=["digits_truncated.onnx"], inputs={model: digest}, output=out)
    assert "not a valid ONNX model" in msg or "not an ONNX model" in msg


def test_model_failing_onnx_checker(cli, tmp_path):
    """Parses, but a node reads a tensor nobody produces: the checker's complaint, one line."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("Add", ["x", "ghost"], ["y"], name="add0")
    model_proto = helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    model = tmp_path / "broken.onnx"
    model.write_bytes(model_proto.SerializeToString())
    digest = sha256(model)
    out = tmp_path / "out"
    rc, _, err = cli("build", model, "-o", out)
    assert_bad_input(rc, err, mentions=["broken.onnx", "checker"], inputs={model: digest}, output=out)


# --- 5: a valid model TVM cannot import ---------------------------------------------------------


def _det_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    node = helper.make_node("Det", ["x"], ["y"], name="determinant_node")
    return make_model(helper.make_graph([node], "det", [x], [y]))


def _lpnorm_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    node = helper.make_node("LpNormalization", ["x"], ["y"], name="lp_norm_node", axis=1, p=2)
    return make_model(helper.make_graph([node], "lpnorm", [x], [y]))


# Standard-domain ops that ONNX Runtime runs and the checker accepts; the test uses the first one
# TVM's Relax ONNX frontend has no converter for.
_UNSUPPORTED_CANDIDATES = {"Det": (_det_model, "determinant_node"), "LpNormalization": (_lpnorm_model, "lp_norm_node")}


def _unsupported_op() -> tuple[str, onnx.ModelProto, str]:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map())
    for op, (build, node) in _UNSUPPORTED_CANDIDATES.items():
        if op not in known:
            return op, build(), node
    pytest.skip(f"TVM now converts every candidate op ({', '.join(_UNSUPPORTED_CANDIDATES)}); pick another")


def test_op_tvm_cannot_import(cli, tmp_path):
    op, model_proto, node = _unsupported_op()
    model = save(model_proto, tmp_path / "uses_unsupported.onnx")
    digest = sha256(model)
    out = tmp_path / "bundle"
    rc, _, err = cli("build", model, "--target", "host", "-o", out)
    assert_bad_input(rc, err, mentions=[node, repr(op)], inputs={model: digest}, output=out)


# --- 6: dynamic inputs and --input-shape ---------------------------------------------------------


@pytest.fixture
def dynamic_file(tmp_path) -> Path:
    return save(relu_model(("batch", 4), input_name="pixels"), tmp_path / "dynamic.onnx")


def test_dynamic_input_without_shape(cli, tmp_path, dynamic_file):
    digest = sha256(dynamic_file)
    out = tmp_path / "out"
    rc, _, err = cli("build", dynamic_file, "-o", out)
    msg = assert_bad_input(rc, err, mentions=["'pixels'", "--input-shape"], inputs={dynamic_file: digest}, output=out)
    assert "pixels=1,4" in msg  # it suggests a usable value


@pytest.mark.parametrize("command", ["build", "inspect"])
def test_input_shape_for_nonexistent_input(cli, tmp_path, dynamic_file, command):
    digest = sha256(dynamic_file)
    out = tmp_path / "out"
    extra = ["-o", out] if command == "build" else []
    rc, _, err = cli(command, dynamic_file, "--input-shape", "no_such_input=1,4", *extra)
    msg = assert_bad_input(rc, err, mentions=["no_such_input"], inputs={dynamic_file: digest}, output=out)
    assert "pixels" in msg  # lists the inputs the model does have


@pytest.mark.parametrize(
    "value, mentions",
    [
        ("foo", ["'foo'", "NAME=D1,D2"]),
        ("=1,4", ["'=1,4'"]),
        ("pixels=1,a", ["'pixels=1,a'", "integers"]),
        ("pixels=0,4", ["'pixels=0,4'", "positive"]),
        ("pixels=", ["'pixels='"]),
    ],
)
def test_malformed_input_shape(cli, tmp_path, dynamic_file, value, mentions):
    digest = sha256(dynamic_file)
    out = tmp_path / "out"
    rc, _, err = cli("build", dynamic_file, "--input-shape", value, "-o", out)
    assert_bad_input(rc, err, mentions=["--input-shape", *mentions], inputs={dynamic_file: digest}, output=out)


@pytest.mark.parametrize(
    "value, mentions",
    [("pixels=1,4,1", ["rank 3", "rank 2"]), ("pixels=1,5", ["dim 1", "5", "4"])],
)
def test_input_shape_conflicting_with_model(cli, tmp_path, dynamic_file, value, mentions):
    digest = sha256(dynamic_file)
    out = tmp_path / "out"
    rc, _, err = cli("build", dynamic_file, "--input-shape", value, "-o", out)
    assert_bad_input(rc, err, mentions=["pixels", *mentions], inputs={dynamic_file: digest}, output=out)


# --- 7: unknown target ---------------------------------------------------------------------------


def test_unknown_target(cli, tmp_path, relu_file):
    from edgecomp.targets import list_targets

    digest = sha256(relu_file)
    out = tmp_path / "out"
    rc, _, err = cli("build", relu_file, "--target", "nosuchboard", "-o", out)
    known = [t.name for t in list_targets()]
    assert "host" in known
    assert_bad_input(rc, err, mentions=["'nosuchboard'", "known targets", *known], inputs={relu_file: digest}, output=out)


# --- 8: existing output --------------------------------------------------------------------------


def test_existing_output_refused_without_force(cli, tmp_path):
    out = tmp_path / "existing_bundle"
    (out / "sub").mkdir(parents=True)
    (out / "precious.txt").write_text("do not touch")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01\x02")
    before = tree_digest(out)
    model = digits_example().model_path
    digest = sha256(model)
    rc, _, err = cli("build", "--example", "digits", "--target", "host", "-o", out)
    assert_bad_input(
        rc, err, mentions=["existing_bundle", "already exists", "--force"], inputs={model: digest}, output=out, output_existed=True
    )
    assert tree_digest(out) == before


def test_existing_file_output_refused_even_with_force(cli, tmp_path, relu_file):
    out = tmp_path / "notes.txt"
    out.write_text("not a bundle")
    digest = sha256(relu_file)
    rc, _, err = cli("build", relu_file, "-o", out, "--force")
    assert_bad_input(rc, err, mentions=["notes.txt", "not a bundle"], inputs={relu_file: digest}, output=out, output_existed=True)
    assert out.read_text() == "not a bundle"


def test_force_replaces_existing_bundle(cli, tmp_path, relu_file):
    from edgecomp.bundle import load_bundle

    out = tmp_path / "bundle"
    rc, _, err = cli("build", relu_file, "--target", "host", "-o", out)
    assert rc == 0, err
    old = json.loads((out / "manifest.json").read_text())
    assert old["model"]["name"] == "relu"

    model = digits_example().model_path
    digest = sha256(model)
    rc, _, err = cli("build", "--example", "digits", "--target", "host", "-o", out, "--force")
    assert rc == 0, err
    assert "Traceback" not in err
    assert sha256(model) == digest
    new = json.loads((out / "manifest.json").read_text())
    assert new["model"]["name"] == "digits_cnn"
    load_bundle(out).close()  # every file matches the new manifest: nothing of the old bundle is left
    assert not staging_leftovers(tmp_path)


@pytest.mark.parametrize(
    "name,user_file,mentions",
    [
        ("bundle.tar", "precious.txt", ["bundle.tar"]),  # a folder named like a .tar bundle
        ("docs", "thesis.tex", ["docs", "not a bundle directory"]),  # a user's folder
    ],
)
def test_force_never_replaces_what_is_not_a_bundle(cli, tmp_path, relu_file, name, user_file, mentions):
    out = tmp_path / name
    out.mkdir()
    (out / user_file).write_text("do not touch")
    before = tree_digest(out)
    digest = sha256(relu_file)
    rc, _, err = cli("build", relu_file, "--target", "host", "-o", out, "--force")
    try:
        assert_bad_input(rc, err, mentions=mentions, inputs={relu_file: digest}, output=out, output_existed=True)
    finally:
        assert tree_digest(out) == before
        assert not staging_leftovers(tmp_path)


# --- 9-10: external data -------------------------------------------------------------------------


def test_external_data_missing(cli, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    model = folder / "ext.onnx"
    onnx.save_model(
        matmul_model(),
        str(model),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="w.bin",
        size_threshold=0,
    )
    assert (folder / "w.bin").is_file()
    (folder / "w.bin").unlink()
    digest = sha256(model)
    out = tmp_path / "out"
    rc, _, err = cli("build", model, "-o", out)
    assert_bad_input(rc, err, mentions=["ext.onnx", "'w.bin'", "'W'", "missing"], inputs={model: digest}, output=out)


def _model_with_external_location(location: str, data: bytes) -> onnx.ModelProto:
    model = matmul_model()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return model


@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_external_data_outside_model_folder(cli, tmp_path, how):
    data = numpy_helper.to_array(matmul_model().graph.initializer[0]).tobytes()
    evil = tmp_path / "evil.bin"  # exists and is big enough: only the escape check can refuse it
    evil.write_bytes(data)
    folder = tmp_path / "model"
    folder.mkdir()
    location = "../evil.bin" if how == "relative" else str(evil)
    model = folder / "escape.onnx"
    model.write_bytes(_model_with_external_location(location, data).SerializeToString())
    digests = {model: sha256(model), evil: sha256(evil)}
    out = tmp_path / "out"
    rc, _, err = cli("build", model, "-o", out)
    assert_bad_input(rc, err, mentions=["escape.onnx", repr(location), "'W'", "outside"], inputs=digests, output=out)


def test_external_data_inside_folder_is_fine(cli, tmp_path):
    """Control for the two tests above: the same construction with a local file builds."""
    data = numpy_helper.to_array(matmul_model().graph.initializer[0]).tobytes()
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "w.bin").write_bytes(data)
    model = folder / "local.onnx"
    model.write_bytes(_model_with_external_location("w.bin", data).SerializeToString())
    rc, out, err = cli("inspect", model, "--json")
    assert rc == 0, err
    assert json.loads(out)["params"] == 12


# --- 11: run on something that is not a bundle ---------------------------------------------------


def test_run_missing_bundle(cli, tmp_path):
    rc, _, err = cli("run", tmp_path / "no_bundle_here")
    assert_bad_input(rc, err, mentions=["no_bundle_here", "not found"])


def test_run_directory_that_is_not_a_bundle(cli, tmp_path):
    folder = tmp_path / "just_a_folder"
    folder.mkdir()
    (folder / "file.txt").write_text("hello")
    before = tree_digest(folder)
    rc, _, err = cli("run", folder)
    assert_bad_input(rc, err, mentions=["just_a_folder", "not an edgecomp bundle"])
    assert tree_digest(folder) == before


def test_run_file_that_is_not_a_bundle(cli, tmp_path):
    fake = tmp_path / "fake.tar"
    fake.write_text("not a tar")
    rc, _, err = cli("run", fake)
    assert_bad_input(rc, err, mentions=["fake.tar"], inputs={fake: sha256(fake)})


# --- 12: output that would overwrite the input ---------------------------------------------------


@pytest.mark.parametrize("where", ["model itself", "model's folder"])
def test_output_is_the_input_model(cli, tmp_path, relu_file, where):
    out = relu_file if where == "model itself" else relu_file.parent
    digest = sha256(relu_file)
    before = tree_digest(tmp_path)
    rc, _, err = cli("build", relu_file, "--target", "host", "-o", out, "--force")
    assert_bad_input(rc, err, mentions=["relu.onnx", "overwrite"], inputs={relu_file: digest})
    assert tree_digest(tmp_path) == before
    assert not staging_leftovers(tmp_path)


# --- the same rule without -q, and through ``python -m edgecomp`` --------------------------------

def _case_missing(tmp_path):
    return ["build", tmp_path / "missing.onnx", "-o", tmp_path / "out"]


def _case_dynamic(tmp_path):
    return ["build", save(relu_model(("batch", 4)), tmp_path / "dyn.onnx"), "-o", tmp_path / "out"]


def _case_run_missing(tmp_path):
    return ["run", tmp_path / "missing_bundle"]


def _case_target(tmp_path):
    return ["build", save(relu_model(), tmp_path / "m.onnx"), "--target", "nosuchboard", "-o", tmp_path / "out"]


def _case_bad_shape(tmp_path):
    return ["build", save(relu_model(), tmp_path / "m.onnx"), "--input-shape", "foo", "-o", tmp_path / "out"]


def _case_exists(tmp_path):
    (tmp_path / "out").mkdir()
    return ["build", save(relu_model(), tmp_path / "m.onnx"), "-o", tmp_path / "out"]


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(_case_missing, id="missing-model"),
        pytest.param(_case_dynamic, id="dynamic-input"),
        pytest.param(_case_run_missing, id="run-missing-bundle"),
        pytest.param(_case_target, id="unknown-target"),
        pytest.param(_case_bad_shape, id="malformed-input-shape"),
        pytest.param(_case_exists, id="output-exists"),
    ],
)
def test_default_progress_keeps_error_to_one_line(cli, tmp_path, case):
    argv = case(tmp_path)
    rc, _, err = cli(*argv, quiet=False)
    assert_bad_input(rc, err)


def test_python_m_edgecomp_bad_input(tmp_path):
    model = tmp_path / "missing_model.onnx"
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSTARTUP",)}
    proc = subprocess.run(
        [sys.executable, "-m", "edgecomp", "build", str(model), "--target", "host", "-o", str(out), "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert proc.stdout == ""
    assert_bad_input(proc.returncode, proc.stderr, mentions=["missing_model.onnx"], output=out)
    assert sorted(os.listdir(tmp_path)) == []  # nothing created in the working folder either
