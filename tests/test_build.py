"""End to end: ONNX in, bundle out, outputs held to ONNX Runtime on the original model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import edgecomp
from edgecomp.examples import get_example
from edgecomp.targets.lowering import elf_arch

from conftest import transformer_block


def _ort(model_path_or_proto, feeds):
    data = model_path_or_proto if isinstance(model_path_or_proto, str) else model_path_or_proto.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_digits_host_matches_ort_on_whole_test_split(digits_host_bundle):
    ex = get_example("digits")
    x, y = ex.split("test")
    ref = _ort(str(ex.model_path), {"input": x})[0]  # ORT runs the dynamic-batch original at once
    got = edgecomp.run_bundle(digits_host_bundle.path, {"input": x[:, None]})["logits"][:, 0]
    assert got.shape == ref.shape == (len(y), 10)
    assert np.max(np.abs(got - ref)) <= 1e-4
    assert np.mean(got.argmax(1) == y) == np.mean(ref.argmax(1) == y)
    assert np.array_equal(got.argmax(1), ref.argmax(1))
    # The build's own evaluation says the same thing, and the accuracy is the trained model's.
    ev = digits_host_bundle.verification["evaluation"]
    assert ev["predictions_identical"] and ev["compiled_accuracy"] == pytest.approx(np.mean(ref.argmax(1) == y))
    assert ev["compiled_accuracy"] > 0.95


def test_digits_host_manifest(digits_host_bundle):
    m = json.loads((digits_host_bundle.path / "manifest.json").read_text())
    assert m["format"] == "edgecomp-bundle" and m["format_version"] == 1
    assert m["inputs"] == [{"name": "input", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    assert m["outputs"] == [{"name": "logits", "shape": [1, 10], "dtype": "float32"}]
    assert [p["name"] for p in m["passes"]] == ["shape", "fold", "dce", "shape"]
    assert all(p["numerics"]["ok"] for p in m["passes"])
    assert set(m["files"]) == {"model.so", "weights.npz", "reference/inputs.npz", "reference/outputs.npz", "report.md", "report.html"}
    # Weights live apart from the code: every initializer is in weights.npz, with the same values.
    model = onnx.load(str(get_example("digits").model_path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    # Fully connected weights (Gemm transB=1) are stored transposed, [K, N], conv weights HWIO (the
    # host's code is NHWC), biases as [1, 1, 1, C]; the manifest says which.
    undo = {"transposed": lambda a: a.T, "HWIO": lambda a: a.transpose(3, 2, 0, 1), None: lambda a: a}
    with np.load(digits_host_bundle.path / "weights.npz") as w:
        stored = {p["name"]: undo[p.get("layout")](w[p["key"]]) for p in m["params"]}
    assert set(stored) == set(inits)
    assert {p["name"]: p["layout"] for p in m["params"] if p.get("layout")} == {
        "6.weight": "transposed", "8.weight": "transposed", "0.weight": "HWIO", "2.weight": "HWIO"}
    for name, value in inits.items():
        np.testing.assert_array_equal(stored[name].reshape(value.shape), value)
    assert "accuracy" in (digits_host_bundle.path / "report.md").read_text()


def test_digits_arm64_is_aarch64_elf(digits_arm64_bundle):
    so = digits_arm64_bundle.path / "model.so"
    assert elf_arch(so) == "aarch64"
    assert so.read_bytes()[:4] == b"\x7fELF"
    m = digits_arm64_bundle.manifest
    assert m["target"]["tvm_target"] == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    assert m["verification"]["numerics"]["ok"]
    assert "not executed here" in m["verification"]["ran"]
    # The arm64 bundle refuses to run on an x86-64 host, with a clear error instead of a crash.
    if elf_arch("/proc/self/exe") != "aarch64":
        with pytest.raises(edgecomp.BundleError, match="aarch64 code"):
            edgecomp.run_bundle(digits_arm64_bundle.path)


def test_transformer_block_host_matches_ort(tmp_path):
    model = transformer_block()
    path = tmp_path / "block.onnx"
    onnx.save(model, path)
    result = edgecomp.build(path, target="host", output=tmp_path / "b", input_shapes={"x": (2, 16, 32)})
    assert result.verification["numerics"]["ok"]
    # Fresh inputs, not the ones the build checked on.
    x = np.random.default_rng(123).standard_normal((5, 2, 16, 32)).astype(np.float32) * 2
    got = edgecomp.run_bundle(result.path, {"x": x})["y"]
    ref = np.stack([_ort(str(path), {"x": xi})[0] for xi in x])
    assert got.shape == ref.shape == (5, 2, 16, 32)
    assert np.max(np.abs(got - ref)) <= 1e-4 + 1e-5 * np.max(np.abs(ref))
    # One sample of the exact input shape comes back without the sample axis.
    single = edgecomp.run_bundle(result.path, {"x": x[0]})["y"]
    np.testing.assert_allclose(single, ref[0], atol=1e-4)


def test_transformer_block_arm64_builds(tmp_path):
    path = tmp_path / "block.onnx"
    onnx.save(transformer_block(), path)
    result = edgecomp.build(path, target="arm64", output=tmp_path / "b.tar", input_shapes={"x": (1, 16, 32)})
    assert result.path.is_file() and result.path.suffix == ".tar"
    b = edgecomp.load_bundle(result.path)
    try:
        assert elf_arch(b.root / "model.so") == "aarch64"
    finally:
        b.close()


def test_folded_shape_initializers_stay_static_for_tvm(tmp_path):
    """Constant folding turns an exporter's Shape→Concat→Expand into an initializer; TVM must still
    see the target shape at compile time (it is inlined as a Constant, not made a parameter)."""
    from onnx import TensorProto, helper, numpy_helper

    n = helper.make_node
    g = helper.make_graph(
        [
            n("Shape", ["x"], ["s"], name="shape"),
            n("Concat", ["s", "extra"], ["target"], name="concat", axis=0),
            n("Reshape", ["x", "flat"], ["x2"], name="reshape"),
            n("Expand", ["x", "target_short"], ["xe"], name="expand_short"),
            n("Add", ["xe", "x2"], ["y"], name="add"),
            n("Clip", ["y", "lo", "hi"], ["z"], name="clip"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 4])],
        [
            numpy_helper.from_array(np.array([1], np.int64), "extra"),
            numpy_helper.from_array(np.array([1, 4], np.int64), "flat"),
            numpy_helper.from_array(np.array([3, 4], np.int64), "target_short"),
            numpy_helper.from_array(np.array(-0.5, np.float32), "lo"),
            numpy_helper.from_array(np.array(0.5, np.float32), "hi"),
        ],
    )
    path = tmp_path / "expand.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    result = edgecomp.build(path, target="host", output=tmp_path / "b")
    assert result.verification["numerics"]["ok"]
    assert result.manifest["params"] == []  # shapes and clip limits became code, not weights
    x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
    got = edgecomp.run_bundle(result.path, {"x": x})["z"]
    np.testing.assert_allclose(got, _ort(str(path), {"x": x})[0], atol=1e-6)
    assert got.shape == (3, 4)
