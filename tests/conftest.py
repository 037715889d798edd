"""Shared fixtures: bundles of the shipped example, built once per test session."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgecomp


@pytest.fixture
def cli(capsys):
    """``cli(*argv, quiet=True) -> (exit code, stdout, stderr)``, running ``edgecomp`` in-process.

    In-process because importing TVM in a fresh process is slow; argparse usage errors exit
    through SystemExit and are returned as their code.
    """
    from edgecomp.cli import main

    def run(*argv, quiet: bool = True) -> tuple[int, str, str]:
        args = [str(a) for a in argv] + (["-q"] if quiet else [])
        capsys.readouterr()  # drop anything printed before
        try:
            rc = main(args)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return rc, out, err

    return run


@pytest.fixture(scope="session")
def digits_host_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "digits-host"
    return edgecomp.build(example="digits", target="host", output=out)


@pytest.fixture(scope="session")
def digits_arm64_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "digits-arm64"
    return edgecomp.build(example="digits", target="arm64", output=out)


def transformer_block(seq: int = 16, dim: int = 32, ffn: int = 64, seed: int = 0) -> onnx.ModelProto:
    """One pre-LN transformer encoder block written with onnx.helper (opset 17).

    x → LayerNorm → Q/K/V MatMuls → softmax(QKᵀ/√d)·V → output MatMul → +x → LayerNorm →
    MatMul → GELU (Erf form) → MatMul → +residual. Input ``x`` has a dynamic batch dim.
    """
    rng = np.random.default_rng(seed)

    def w(name, *shape, scale=None):
        scale = scale or 1.0 / np.sqrt(shape[0])
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        w("Wq", dim, dim), w("Wk", dim, dim), w("Wv", dim, dim), w("Wo", dim, dim),
        w("W1", dim, ffn), w("W2", ffn, dim),
        numpy_helper.from_array(np.ones(dim, np.float32), "g1"),
        numpy_helper.from_array(np.zeros(dim, np.float32), "b1"),
        numpy_helper.from_array((1 + 0.1 * rng.standard_normal(dim)).astype(np.float32), "g2"),
        numpy_helper.from_array((0.1 * rng.standard_normal(dim)).astype(np.float32), "b2"),
        numpy_helper.from_array((0.1 * rng.standard_normal(ffn)).astype(np.float32), "bf1"),
        numpy_helper.from_array(np.array(1 / np.sqrt(dim), np.float32), "scale"),
        numpy_helper.from_array(np.array(1 / np.sqrt(2), np.float32), "inv_sqrt2"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
    ]
    n = helper.make_node
    nodes = [
        n("LayerNormalization", ["x", "g1", "b1"], ["ln1"], name="ln1", axis=-1, epsilon=1e-5),
        n("MatMul", ["ln1", "Wq"], ["q"], name="q_proj"),
        n("MatMul", ["ln1", "Wk"], ["k"], name="k_proj"),
        n("MatMul", ["ln1", "Wv"], ["v"], name="v_proj"),
        n("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
        n("MatMul", ["q", "kt"], ["scores"], name="scores"),
        n("Mul", ["scores", "scale"], ["scaled"], name="scale"),
        n("Softmax", ["scaled"], ["attn"], name="softmax", axis=-1),
        n("MatMul", ["attn", "v"], ["ctx"], name="context"),
        n("MatMul", ["ctx", "Wo"], ["proj"], name="o_proj"),
        n("Add", ["x", "proj"], ["h"], name="residual1"),
        n("LayerNormalization", ["h", "g2", "b2"], ["ln2"], name="ln2", axis=-1, epsilon=1e-5),
        n("MatMul", ["ln2", "W1"], ["f1"], name="ffn_in"),
        n("Add", ["f1", "bf1"], ["f1b"], name="ffn_in_bias"),
        n("Mul", ["f1b", "inv_sqrt2"], ["gs"], name="gelu_scale"),
        n("Erf", ["gs"], ["ge"], name="gelu_erf"),
        n("Add", ["ge", "one"], ["ge1"], name="gelu_add"),
        n("Mul", ["f1b", "ge1"], ["gm"], name="gelu_mul"),
        n("Mul", ["gm", "half"], ["gelu"], name="gelu_half"),
        n("MatMul", ["gelu", "W2"], ["f2"], name="ffn_out"),
        n("Add", ["h", "f2"], ["y"], name="residual2"),
    ]
    graph = helper.make_graph(
        nodes,
        "transformer_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq, dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", seq, dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgecomp-tests")
    onnx.checker.check_model(model, full_check=True)
    return model
