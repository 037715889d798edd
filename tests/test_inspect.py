"""``edgecomp inspect``: parameters, op histogram and per-layer MACs/FLOPs, checked independently."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import digits_example, make_model, save

from edgecomp.cli import main


@pytest.fixture
def cli(capsys):
    """``cli(*argv) -> (exit code, stdout, stderr)``, running ``edgecomp`` in-process (quiet)."""

    def run(*argv) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main([str(a) for a in argv] + ["-q"])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def inspect_json(cli, *argv) -> dict:
    rc, out, err = cli("inspect", *argv, "--json")
    assert rc == 0, err
    assert "Traceback" not in err
    return json.loads(out)


# --- the shipped example -------------------------------------------------------------------------

# Architecture of digits_cnn.onnx, input [1, 1, 8, 8]:
#   /0/Conv 1->16, 3x3, pad 1   -> [1, 16, 8, 8]: 16*8*8 outputs x (1*3*3)  MACs
#   /2/Conv 16->32, 3x3, pad 1  -> [1, 32, 8, 8]: 32*8*8 outputs x (16*3*3) MACs
#   /4/MaxPool 2                -> [1, 32, 4, 4]  (no MACs) ; Flatten -> [1, 512]
#   /6/Gemm 512->64             -> [1, 64]:  64 outputs x 512 MACs
#   /8/Gemm 64->10              -> [1, 10]:  10 outputs x 64 MACs
DIGITS_LAYERS = {
    "/0/Conv": ("Conv", [16, 1, 3, 3], [1, 16, 8, 8], 16 * 1 * 9 + 16, 16 * 8 * 8 * 1 * 3 * 3),
    "/2/Conv": ("Conv", [32, 16, 3, 3], [1, 32, 8, 8], 32 * 16 * 9 + 32, 32 * 8 * 8 * 16 * 3 * 3),
    "/6/Gemm": ("Gemm", [64, 512], [1, 64], 64 * 512 + 64, 64 * 512),
    "/8/Gemm": ("Gemm", [10, 64], [1, 10], 10 * 64 + 10, 10 * 64),
}


def test_digits_json_matches_independent_count(cli):
    s = inspect_json(cli, "--example", "digits")
    model = onnx.load(str(digits_example().model_path))
    inits = list(model.graph.initializer)

    assert s["params"] == sum(int(np.prod(t.dims)) for t in inits) == 38282
    assert s["param_bytes"] == sum(numpy_helper.to_array(t).nbytes for t in inits) == 4 * 38282
    assert s["initializers"] == len(inits)
    assert s["constant_params"] == 0
    assert s["ops"] == dict(collections.Counter(n.op_type for n in model.graph.node))
    assert s["nodes"] == len(model.graph.node)
    assert s["opset"] == 17
    assert [i["name"] for i in s["inputs"]] == ["input"]
    assert [o["name"] for o in s["outputs"]] == ["logits"]
    assert s["assumed_dims"] == {}  # the example states its shape

    layers = {layer["node"]: layer for layer in s["layers"]}
    assert list(layers) == list(DIGITS_LAYERS)  # in graph order, only contraction layers
    for name, (op, weight, output, params, macs) in DIGITS_LAYERS.items():
        layer = layers[name]
        assert layer["op"] == op, name
        assert layer["weight_shape"] == weight, name
        assert layer["output_shape"] == output, name
        assert layer["params"] == params, name
        assert layer["macs"] == macs, name
        assert layer["flops"] == 2 * macs, name
    total = sum(v[4] for v in DIGITS_LAYERS.values())
    assert total == 9216 + 294912 + 32768 + 640
    assert s["total_macs"] == total
    assert s["total_flops"] == 2 * total
    assert sum(layer["params"] for layer in s["layers"]) == s["params"]  # every weight is in a layer


def test_digits_human_output(cli):
    rc, out, err = cli("inspect", "--example", "digits")
    assert rc == 0, err
    model = onnx.load(str(digits_example().model_path))
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    nbytes = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert f"{params:,}" == "38,282"
    assert f"parameters: {params:,} in {len(model.graph.initializer)} initializers, {nbytes:,} bytes" in out
    lines = out.splitlines()
    for name in DIGITS_LAYERS:
        assert any(line.startswith(name + " ") for line in lines), f"layer {name} missing:\n{out}"
    assert "opset 17" in out
    assert "Conv 2" in out and "Gemm 2" in out
    total_line = next(line for line in lines if line.startswith("total"))
    assert f"{params:,}" in total_line
    assert f"{2 * sum(v[4] for v in DIGITS_LAYERS.values()) / 1e6:.3f}" in total_line


# --- a hand-built model: batched MatMul, grouped strided Conv, dynamic batch ---------------------

# img [batch, 4, 6, 6] -> Conv(W [8, 2, 3, 3], group=2, stride 2, pad 1) -> [batch, 8, 3, 3]
#   each output element sums over Cin/group * 3 * 3 = 2 * 9 inputs: 8*3*3 * 18 = 1296 MACs per image
# seq [batch, 3, 4] @ M [4, 5] -> [batch, 3, 5]: 3*5 outputs x 4 = 60 MACs per batch element
CONV_MACS_PER_BATCH = 8 * 3 * 3 * (4 // 2) * 3 * 3
MATMUL_MACS_PER_BATCH = 3 * 5 * 4


def _grouped_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 2, 3, 3)).astype(np.float32), "conv_w")
    m = numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "mm_w")
    img = helper.make_tensor_value_info("img", TensorProto.FLOAT, ["batch", 4, 6, 6])
    seq = helper.make_tensor_value_info("seq", TensorProto.FLOAT, ["batch", 3, 4])
    conv_out = helper.make_tensor_value_info("conv_out", TensorProto.FLOAT, ["batch", 8, 3, 3])
    mm_out = helper.make_tensor_value_info("mm_out", TensorProto.FLOAT, ["batch", 3, 5])
    nodes = [
        helper.make_node(
            "Conv", ["img", "conv_w"], ["conv_out"], name="grouped_conv", group=2, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]
        ),
        helper.make_node("MatMul", ["seq", "mm_w"], ["mm_out"], name="batched_matmul"),
    ]
    graph = helper.make_graph(nodes, "grouped", [img, seq], [conv_out, mm_out], initializer=[w, m])
    return make_model(graph)


@pytest.fixture
def grouped_file(tmp_path):
    return save(_grouped_model(), tmp_path / "grouped.onnx")


def test_grouped_conv_and_matmul_with_shapes(cli, grouped_file):
    s = inspect_json(cli, grouped_file, "--input-shape", "img=3,4,6,6", "--input-shape", "seq=2,3,4")
    assert s["assumed_dims"] == {}
    layers = {layer["node"]: layer for layer in s["layers"]}
    conv, mm = layers["grouped_conv"], layers["batched_matmul"]
    assert conv["output_shape"] == [3, 8, 3, 3]
    assert conv["weight_shape"] == [8, 2, 3, 3]
    assert conv["params"] == 8 * 2 * 3 * 3
    assert conv["macs"] == 3 * CONV_MACS_PER_BATCH == 3888
    assert mm["output_shape"] == [2, 3, 5]
    assert mm["weight_shape"] == [4, 5]
    assert mm["params"] == 20
    assert mm["macs"] == 2 * MATMUL_MACS_PER_BATCH == 120
    assert mm["flops"] == 240
    assert s["total_macs"] == 3888 + 120
    assert s["params"] == 144 + 20
    # the summary reports the model's own (dynamic) inputs, not the shapes it assumed
    assert [i["shape"] for i in s["inputs"]] == [["batch", 4, 6, 6], ["batch", 3, 4]]


def test_grouped_conv_and_matmul_assumes_batch_1(cli, grouped_file):
    s = inspect_json(cli, grouped_file)
    assert s["assumed_dims"] == {"img": [1, 4, 6, 6], "seq": [1, 3, 4]}
    layers = {layer["node"]: layer for layer in s["layers"]}
    assert layers["grouped_conv"]["output_shape"] == [1, 8, 3, 3]
    assert layers["grouped_conv"]["macs"] == CONV_MACS_PER_BATCH == 1296
    assert layers["batched_matmul"]["output_shape"] == [1, 3, 5]
    assert layers["batched_matmul"]["macs"] == MATMUL_MACS_PER_BATCH == 60
    assert s["total_flops"] == 2 * (1296 + 60)


def test_partial_input_shape_assumes_only_the_rest(cli, grouped_file):
    s = inspect_json(cli, grouped_file, "--input-shape", "seq=2,3,4")
    assert s["assumed_dims"] == {"img": [1, 4, 6, 6]}
    layers = {layer["node"]: layer for layer in s["layers"]}
    assert layers["grouped_conv"]["macs"] == 1296
    assert layers["batched_matmul"]["macs"] == 120


def test_human_output_says_what_it_assumed(cli, grouped_file):
    rc, out, err = cli("inspect", grouped_file)
    assert rc == 0, err
    assert "FLOPs assume img=[1, 4, 6, 6], seq=[1, 3, 4]" in out
    assert "--input-shape" in out
    assert "grouped_conv" in out and "batched_matmul" in out


def test_digits_with_larger_batch_scales_macs(cli):
    s = inspect_json(cli, "--example", "digits", "--input-shape", "input=4,1,8,8")
    layers = {layer["node"]: layer for layer in s["layers"]}
    for name, (_, _, output, _, macs) in DIGITS_LAYERS.items():
        assert layers[name]["output_shape"] == [4, *output[1:]], name
        assert layers[name]["macs"] == 4 * macs, name
    assert s["params"] == 38282  # parameters do not depend on the batch
