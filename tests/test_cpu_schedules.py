"""Default CPU schedules (targets/cpu_schedules.py) and the CPU lowering around them.

Every kernel kind the rules handle is built from a tiny ONNX graph, compiled for the host with the
default schedules, and compared with ONNX Runtime on the same inputs (fp32: max abs error ≤ 1e-4
on outputs of magnitude ~1–10, i.e. summation order only; a wrong tile or index is off by O(1)).
The same graphs are checked to be *scheduled* (a rule took every contraction), so a rule that
silently stops applying fails here rather than as a slow benchmark.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecomp.targets.arm_cpu import ARM64
from edgecomp.targets.base import get_target
from edgecomp.targets.host import HOST
from edgecomp.targets.lowering import compile_relax, gemm_weights_kn, prepare_module, to_relax

tvm = pytest.importorskip("tvm")
ort = pytest.importorskip("onnxruntime")

RNG = np.random.default_rng(0)


def _w(*shape, name):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32) * 0.3, name=name)


def _model(nodes, x_shape, y_shape, inits, y_name="y") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info(y_name, TensorProto.FLOAT, list(y_shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def conv_block(cin, cout, hw, k, stride, group, relu6=True):
    pad = k // 2
    out = (hw + 2 * pad - k) // stride + 1
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], kernel_shape=[k, k], strides=[stride, stride],
                              pads=[pad] * 4, group=group)]
    nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["y"]) if relu6 else helper.make_node("Relu", ["c"], ["y"]))
    inits = [_w(cout, cin // group, k, k, name="W"), _w(cout, name="B"),
             numpy_helper.from_array(np.array(0, np.float32), "lo"), numpy_helper.from_array(np.array(6, np.float32), "hi")]
    return _model(nodes, (1, cin, hw, hw), (1, cout, out, out), inits if relu6 else inits[:2])


def matmul_gelu(m, k, n):
    """x @ W + b, then GELU written as exporters write it (erf), plus a residual-style Add."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["h"]),
        helper.make_node("Div", ["h", "sqrt2"], ["hd"]),
        helper.make_node("Erf", ["hd"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]),
        helper.make_node("Mul", ["h", "e1"], ["g"]),
        helper.make_node("Mul", ["g", "half"], ["y"]),
    ]
    inits = [_w(k, n, name="W"), _w(n, name="b"), numpy_helper.from_array(np.array(1.4142135, np.float32), "sqrt2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"), numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    return _model(nodes, (1, m, k), (1, m, n), inits)


def gemm(m, k, n):
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)]
    return _model(nodes, (m, k), (m, n), [_w(n, k, name="W"), _w(n, name="B")])


def softmax_rows(rows, cols):
    return _model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], (1, rows, cols), (1, rows, cols), [])


def layer_norm(rows, cols):
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)]
    return _model(nodes, (1, rows, cols), (1, rows, cols), [_w(cols, name="g"), _w(cols, name="b")])


CASES = {
    "conv1x1-14": lambda: conv_block(32, 48, 14, 1, 1, 1),
    "conv1x1-7": lambda: conv_block(40, 24, 7, 1, 1, 1, relu6=False),
    "conv1x1-7-wide": lambda: conv_block(64, 256, 7, 1, 1, 1),  # weights > input: one panel per task
    "depthwise-wide-s2": lambda: conv_block(64, 64, 14, 3, 2, 64),  # several vectors of channels per pixel
    "conv3x3-s1": lambda: conv_block(8, 16, 12, 3, 1, 1),
    "conv3x3-s2": lambda: conv_block(3, 16, 16, 3, 2, 1),
    "depthwise-s1": lambda: conv_block(24, 24, 14, 3, 1, 24),
    "depthwise-s2": lambda: conv_block(24, 24, 14, 3, 2, 24),
    "matmul-gelu": lambda: matmul_gelu(16, 48, 40),
    "gemm-transB": lambda: gemm(2, 36, 20),
}
ROW_CASES = {
    "softmax": lambda: softmax_rows(24, 64),
    "layer-norm": lambda: layer_norm(12, 96),
}


def _ort(model, x, optimize=True):
    so = ort.SessionOptions()
    if not optimize:  # ORT fuses DequantizeLinear → MatMul into its own int8 kernels: not exact
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _tvm(model, x, target=HOST, channels_last=False, **kw):
    rm = to_relax(model, {"x": x.shape}, {"x": "float32"}, channels_last_convs=channels_last)
    ex = compile_relax(rm, target, **kw)
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(p) for p in rm.params])
    return (out if hasattr(out, "numpy") else out[0]).numpy()


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_default_schedules_match_onnxruntime(case, layout):
    """Both layouts: NHWC is what CPU builds compile, NCHW what they compile with --int8-arith."""
    model = CASES[case]()
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = RNG.standard_normal(shape).astype(np.float32)
    want = _ort(model, x)
    got = _tvm(model, x, channels_last=layout == "nhwc")
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("target", [HOST, ARM64], ids=["host", "arm64"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_contraction_is_scheduled(case, target, layout):
    """The rule takes every conv/matmul kernel (a rule that stops applying is a slow build)."""
    from edgecomp.targets.cpu_schedules import schedule_report

    model = CASES[case]()
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    rm = to_relax(model, {"x": tuple(shape)}, {"x": "float32"}, channels_last_convs=layout == "nhwc")
    report = schedule_report(prepare_module(rm, target), target.tvm())
    kernels = {k: v for k, v in report.items() if "conv" in k or "matmul" in k}
    assert kernels and all(v == "Contraction" for v in kernels.values()), report
    assert "none" not in report.values(), report


def test_compiled_code_carries_the_schedules():
    """The build applies the schedules (not only the rules in isolation): the compiled conv kernel
    runs its tiles on TVM's thread pool and uses packed FMAs; TVM's unscheduled code (what
    ``default_schedules=False`` gives) has no parallel loop at all. Speed itself is measured by
    tools/bench_tune.py, not here."""
    model = conv_block(64, 128, 28, 1, 1, 1)
    rm = to_relax(model, {"x": (1, 64, 28, 28)}, {"x": "float32"})

    def asm(flag):
        ex = compile_relax(rm, HOST, default_schedules=flag)
        return "".join(m.inspect_source("asm") for m in [ex.mod, *ex.mod.imports] if m.kind == "llvm")

    scheduled, plain = asm(True), asm(False)
    assert "TVMBackendParallelLaunch" in scheduled and "TVMBackendParallelLaunch" not in plain
    assert re.search(r"vfmadd\d+ps\s+%[yz]mm", scheduled)


def test_vector_lanes_follow_the_target():
    from edgecomp.targets.cpu_schedules import vector_lanes

    assert vector_lanes(ARM64.tvm()) == 4  # NEON: 128-bit
    assert vector_lanes(get_target("armv7").tvm()) == 4
    assert vector_lanes(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})) == 8  # AVX2
    assert vector_lanes(tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})) == 16


def test_fast_math_only_on_the_scheduled_cpu_pipeline():
    """erf/exp/tanh/softmax become TVM's polynomial approximations on CPU targets (the GELU test
    above bounds their error against ORT); ``default_schedules=False`` keeps TVM's plain maths."""
    rm = to_relax(matmul_gelu(4, 8, 8), {"x": (1, 4, 8)}, {"x": "float32"})
    fast = prepare_module(rm, HOST).script()
    plain = prepare_module(rm, HOST, fast_math=False).script()
    assert "fast_erf" in fast and "fast_erf" not in plain and "R.erf" in plain


def test_gemm_weights_are_stored_transposed_exactly():
    """Gemm(transB=1) → transB=0 with the initializer transposed: identical outputs under ORT;
    a weight that feeds two nodes is left alone; int8 weights behind a per-channel
    DequantizeLinear stay int8 and move their axis to 1."""
    m = gemm(3, 10, 6)
    out, names = gemm_weights_kn(m)
    assert names == {"W"}
    node = out.graph.node[0]
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "transB")) == 0
    x = RNG.standard_normal((3, 10)).astype(np.float32)
    np.testing.assert_array_equal(_ort(out, x), _ort(m, x))
    assert m.graph.node[0].attribute[0].i == 1  # the input model is not modified

    shared = gemm(3, 10, 10)
    shared.graph.node.append(helper.make_node("Gemm", ["y", "W", "B"], ["y2"], transB=1))
    shared.graph.output[0].name = "y2"
    assert gemm_weights_kn(shared)[1] == frozenset()

    wq = numpy_helper.from_array(RNG.integers(-127, 127, (6, 10)).astype(np.int8), "Wq")
    scale = numpy_helper.from_array(RNG.uniform(0.01, 0.02, 6).astype(np.float32), "s")
    zp = numpy_helper.from_array(np.zeros(6, np.int8), "z")
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["W"], axis=0),
             helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)]
    q = _model(nodes, (3, 10), (3, 6), [wq, scale, zp, _w(6, name="B")])
    qt, names = gemm_weights_kn(q)
    assert names == {"Wq"}
    stored = {t.name: numpy_helper.to_array(t) for t in qt.graph.initializer}
    assert stored["Wq"].dtype == np.int8 and stored["Wq"].shape == (10, 6)
    np.testing.assert_array_equal(_ort(qt, x, optimize=False), _ort(q, x, optimize=False))
    w = numpy_helper.to_array(wq).astype(np.float32) * numpy_helper.to_array(scale)[:, None]
    got = _tvm(qt, x)
    np.testing.assert_allclose(got, x @ w.T + numpy_helper.to_array(q.graph.initializer[3]), atol=1e-5)


def mobilenet_block(int8_weights=False):
    """A MobileNetV2-style block as exporters write it: 3x3/s2 conv + ReLU6 (Clip), depthwise +
    ReLU6, 1x1 projection, a residual Add, global average pool, flatten, classifier Gemm. With
    ``int8_weights`` the projection's weight is int8 behind a per-channel DequantizeLinear."""
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], kernel_shape=[3, 3], pads=[1] * 4, group=16),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"]),
        helper.make_node("Conv", ["r2", "W3", "B3"], ["c3"], kernel_shape=[1, 1]),
        helper.make_node("Add", ["c3", "r1"], ["s"]),
        helper.make_node("GlobalAveragePool", ["s"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "Wc", "Bc"], ["y"], transB=1),
    ]
    inits = [_w(16, 3, 3, 3, name="W1"), _w(16, name="B1"), _w(16, 1, 3, 3, name="W2"), _w(16, name="B2"),
             _w(16, 16, 1, 1, name="W3"), _w(16, name="B3"), _w(10, 16, name="Wc"), _w(10, name="Bc"),
             numpy_helper.from_array(np.array(0, np.float32), "lo"), numpy_helper.from_array(np.array(6, np.float32), "hi")]
    if int8_weights:
        inits[4] = numpy_helper.from_array(RNG.integers(-127, 127, (16, 16, 1, 1)).astype(np.int8), "W3q")
        inits += [numpy_helper.from_array(RNG.uniform(0.005, 0.01, 16).astype(np.float32), "s3"),
                  numpy_helper.from_array(np.zeros(16, np.int8), "z3")]
        nodes.insert(0, helper.make_node("DequantizeLinear", ["W3q", "s3", "z3"], ["W3"], axis=0))
    return _model(nodes, (1, 3, 16, 16), (1, 10), inits)


@pytest.mark.parametrize("int8_weights", [False, True], ids=["fp32", "int8-weights"])
def test_channels_last_import_is_exact_and_prepacks_the_weights(int8_weights):
    """CPU builds import convs as NHWC/HWIO: ReLU6 (Clip with constant bounds) imports as
    maximum/minimum so the layout flows through it; only the input and the pooled output are
    transposed at run time, never a weight (their transposes are applied to the stored values,
    int8 ones too, whose quantization axis follows); same numbers as ONNX Runtime."""
    from edgecomp.targets.lowering import channels_last

    model = mobilenet_block(int8_weights)
    x = RNG.standard_normal((1, 3, 16, 16)).astype(np.float32)
    nchw = to_relax(model, {"x": x.shape}, {"x": "float32"})
    assert "call_tir" not in nchw.mod["main"].script()  # Clip → R.maximum / R.minimum
    rm = channels_last(nchw)
    main = rm.mod["main"].script()
    assert main.count("R.permute_dims(") <= 2 and "R.permute_dims(x" in main
    assert main.count('data_layout="NHWC", kernel_layout="HWIO"') == 3
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    stored = dict(zip(rm.param_names, rm.params))
    w3 = "W3q" if int8_weights else "W3"
    assert {n: rm.layouts[n] for n in ("W1", "W2", w3)} == {"W1": "HWIO", "W2": "HWIO", w3: "HWIO"}
    for name in ("W1", "W2", w3):
        np.testing.assert_array_equal(stored[name], inits[name].transpose(2, 3, 1, 0))
    assert stored[w3].dtype == (np.int8 if int8_weights else np.float32)
    assert stored["B1"].reshape(-1).tolist() == inits["B1"].tolist()  # bias: same order, [1, 1, 1, C]
    want = _ort(model, x, optimize=not int8_weights)
    np.testing.assert_allclose(_tvm(model, x, channels_last=True), want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(_tvm(model, x), want, atol=1e-4, rtol=1e-4)


def test_channels_last_only_where_the_code_wants_it():
    from edgecomp.targets.lowering import wants_channels_last

    assert wants_channels_last(HOST) and wants_channels_last(ARM64) and wants_channels_last(get_target("armv7"))
    assert not wants_channels_last(get_target("mali")) and not wants_channels_last(get_target("cuda"))


def test_clip_with_a_nan_bound_keeps_tvms_conversion():
    """ONNX treats a NaN Clip bound as no bound; TVM's own conversion handles that, so only
    constant, non-NaN bounds become maximum/minimum."""
    nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["y"])]
    inits = [numpy_helper.from_array(np.array(np.nan, np.float32), "lo"), numpy_helper.from_array(np.array(0.5, np.float32), "hi")]
    model = _model(nodes, (2, 8), (2, 8), inits)
    x = RNG.standard_normal((2, 8)).astype(np.float32)
    assert "call_tir" in to_relax(model, {"x": x.shape}, {"x": "float32"}).mod["main"].script()
    np.testing.assert_array_equal(_tvm(model, x), _ort(model, x))


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_row_reductions_are_vector_partial_sums_and_match_onnxruntime(case):
    """Softmax and layer norm: RowReduction takes them (rows in parallel, rfactor-ed vector
    partial sums), the same numbers as ORT up to summation order."""
    from edgecomp.targets.cpu_schedules import schedule_report

    model = ROW_CASES[case]()
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = (RNG.standard_normal(shape) * 3).astype(np.float32)
    rm = to_relax(model, {"x": tuple(shape)}, {"x": "float32"})
    report = schedule_report(prepare_module(rm, HOST), HOST.tvm())
    assert "RowReduction" in report.values(), report
    np.testing.assert_allclose(_tvm(model, x), _ort(model, x), atol=1e-5, rtol=1e-4)


def test_a_failed_channels_last_conversion_keeps_nchw(monkeypatch, caplog):
    """The layout change is an optimization: if it fails on some model, the build goes on with
    ONNX's NCHW layout (correct, slower) and says so, instead of failing."""
    import edgecomp.targets.lowering as lowering

    def broken(_rm):
        raise RuntimeError("no layout rule for this op")

    monkeypatch.setattr(lowering, "channels_last", broken)
    model = mobilenet_block()
    x = RNG.standard_normal((1, 3, 16, 16)).astype(np.float32)
    with caplog.at_level("WARNING"):
        rm = to_relax(model, {"x": x.shape}, {"x": "float32"}, channels_last_convs=True)
    assert "kept NCHW" in caplog.text and "no layout rule" in caplog.text
    assert 'data_layout="NCHW"' in rm.mod["main"].script() and not rm.layouts.keys() - {"Wc"}


@pytest.mark.parametrize("channels,hw", [(144, 56), (192, 28)])
def test_depthwise_tiles_fit_the_registers(channels, hw):
    """MobileNetV2's wide 3x3 depthwise convs (NHWC, AVX-512): the tile's accumulators and one
    kernel row of weight vectors fit the 32 zmm registers, so the compiled kernel keeps no vector
    on the stack (the 24-accumulator tiles spilled 78 and 115 zmm), and matches ONNX Runtime."""
    from edgecomp.targets.lowering import cpu_pipeline

    model = conv_block(channels, channels, hw, 3, 1, channels)
    rm = to_relax(model, {"x": (1, channels, hw, hw)}, {"x": "float32"}, channels_last_convs=True)
    avx512 = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})
    ex = tvm.compile(prepare_module(rm, HOST), target=avx512, relax_pipeline=cpu_pipeline(avx512))
    asm = "".join(m.inspect_source("asm") for m in [ex.mod, *ex.mod.imports] if m.kind == "llvm")
    # the functions doing FMAs: the conv's tiles (not the layout transposes around it)
    asm = "".join(f for f in re.split(r"\.type\s+\S+,@function", asm) if re.search(r"vfmadd\d+ps\s+.*%zmm", f))
    assert asm
    spills = re.findall(r"^\s*vmov\w*\s+(?:%zmm\d+, *-?\w*\(%rsp\)|-?\w*\(%rsp\), *%zmm\d+)", asm, re.M)
    assert not spills, spills[:4]
    x = RNG.standard_normal((1, channels, hw, hw)).astype(np.float32)
    np.testing.assert_allclose(_tvm(model, x, channels_last=True), _ort(model, x), atol=1e-4, rtol=1e-4)
