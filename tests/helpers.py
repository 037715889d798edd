"""Shared helpers for the CLI tests: tiny ONNX models and the "bad input" contract check."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def opsets(version: int = OPSET) -> list[onnx.OperatorSetIdProto]:
    return [helper.make_opsetid("", version)]


def make_model(graph: onnx.GraphProto, opset: int = OPSET) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=opsets(opset))
    model.ir_version = 8  # readable by every onnxruntime the project supports
    onnx.checker.check_model(model)
    return model


def relu_model(shape: Sequence[int | str] = (1, 4), input_name: str = "x") -> onnx.ModelProto:
    """y = Relu(x); ``shape`` may hold dim_param strings such as ``"batch"``."""
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))
    node = helper.make_node("Relu", [input_name], ["y"], name="relu0")
    return make_model(helper.make_graph([node], "relu", [x], [y]))


def matmul_model(batch: int | str = 1, k: int = 4, n: int = 3, seed: int = 0) -> onnx.ModelProto:
    """y = x @ W with W an initializer of shape [k, n]."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), name="W")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, n])
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul0")
    return make_model(helper.make_graph([node], "matmul", [x], [y], initializer=[w]))


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (a snapshot to compare later)."""
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()
    }


def staging_leftovers(folder: Path) -> list[str]:
    """Hidden staging / backup entries a build may leave in ``folder`` (``.NAME.tmp-*``, ``.NAME.old-*``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p.name for p in folder.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)
    )


def assert_bad_input(
    rc: int,
    err: str,
    *,
    mentions: Iterable[str] = (),
    inputs: dict[Path, str] | None = None,
    output: Path | None = None,
    output_existed: bool = False,
) -> str:
    """The product rule for bad input; returns the message (after ``edgecomp: error: ``).

    * exit code 2, no traceback, exactly one non-empty line on stderr starting ``edgecomp: error:``;
    * the message names the problem (every string of ``mentions`` is in it);
    * every file in ``inputs`` (path -> sha256 taken before the run) is unchanged;
    * ``output`` was not created (unless ``output_existed``: then the caller checks it) and its
      folder holds no hidden staging entries.
    """
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("edgecomp: error:"), line
    assert rc == 2, f"exit code {rc}, expected 2 ({line})"
    for text in mentions:
        assert text in line, f"{text!r} not in the message: {line}"
    for path, digest in (inputs or {}).items():
        assert Path(path).is_file(), f"input {path} disappeared"
        assert sha256(Path(path)) == digest, f"input {path} was modified"
    if output is not None:
        output = Path(output)
        if not output_existed:
            assert not output.exists() and not output.is_symlink(), f"output {output} was created"
        leftovers = staging_leftovers(output.parent)
        assert not leftovers, f"staging leftovers in {output.parent}: {leftovers}"
    return line[len("edgecomp: error:"):].strip()


def digits_example():
    from edgecomp.examples import get_example

    return get_example("digits")


def npz_keys(path: Path) -> list[str]:
    with np.load(path) as data:
        return sorted(data.files)


def listdir(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def need_torch():
    """Import torch for the training tests: skipped where torch (an optional extra) is missing,
    a failure when ``EDGECOMP_REQUIRE_TORCH=1`` (CI installs it, so a skip there hides a bug)."""
    import pytest

    try:
        import torch
    except ImportError as err:
        if os.environ.get("EDGECOMP_REQUIRE_TORCH") == "1":
            pytest.fail(f"EDGECOMP_REQUIRE_TORCH=1 but torch is not importable: {err}")
        pytest.skip("torch is not installed (pip install -e '.[train]')", allow_module_level=True)
    return torch
