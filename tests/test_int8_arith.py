"""int8 arithmetic for QDQ models (edgecomp.targets.int8): exact integer maths, ORT agreement, arm64.

Tiny graphs written with onnx.helper, quantized by ONNX Runtime's ``quantize_static`` (QDQ,
per-channel int8 weights) on a fixed calibration set, in three zero-point settings:

- ``s8-sym``: int8 activations with asymmetric (non-zero) zero points, symmetric int8 weights
  (ORT's defaults);
- ``u8-asym``: uint8 activations, asymmetric per-tensor int8 weights (non-zero weight zero
  point): the uint8 shift and every zero-point correction term;
- ``u8-u8w``: uint8 activations and uint8 per-channel weights (zero point 128, a parameter): the
  weight shift, and the weight-independent code that computes every term at run time.

Tolerances:
- integer path vs TVM's own dequantize → fp32 path, with the models' final QuantizeLinear →
  DequantizeLinear removed (so nothing is rounded away): ``max|Δ| ≤ 1e-5·max|ref|``; a wrong
  zero-point or padding term is off by whole quantization steps, ~1e-2 of the range;
- rewritten module vs ORT's int8 model (its own QLinear kernels): at most 1 quantization step
  of the output scale on every element (intermediate requantizations may round a .5 tie the
  other way), and at least 95% of the elements bit-identical.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecomp.targets.arm_cpu import ARM64
from edgecomp.targets.host import HOST
from edgecomp.targets.int8 import count_int_ops, rewrite_int8
from edgecomp.targets.lowering import compile_relax, to_relax

tvm = pytest.importorskip("tvm")
ort = pytest.importorskip("onnxruntime")
quant = pytest.importorskip("onnxruntime.quantization")

SEED = 0
MLP_SHAPE = (4, 16)
CNN_SHAPE = (2, 3, 8, 8)


def _model(nodes, x_shape, y_shape, inits) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mlp_model() -> onnx.ModelProto:
    """MatMul + Add + Relu, then Gemm(transB=1) with bias: both importer forms of a dense layer."""
    rng = np.random.default_rng(SEED)
    init = lambda name, *shape, s=0.3: numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)  # noqa: E731
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "W1"], ["h"]),
        n("Add", ["h", "b1"], ["hb"]),
        n("Relu", ["hb"], ["r"]),
        n("Gemm", ["r", "W2", "b2"], ["y"], transB=1),
    ]
    return _model(nodes, MLP_SHAPE, (MLP_SHAPE[0], 10), [init("W1", 16, 32), init("b1", 32, s=0.1), init("W2", 10, 32), init("b2", 10, s=0.1)])


def cnn_model() -> onnx.ModelProto:
    """Conv(pad 1) → depthwise Conv(stride 2) → dilated Conv → Flatten → Gemm: padding, groups, dilation."""
    rng = np.random.default_rng(SEED + 1)
    init = lambda name, *shape, s=0.3: numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)  # noqa: E731
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "C1", "c1"], ["a1"], pads=[1, 1, 1, 1]),
        n("Relu", ["a1"], ["r1"]),
        n("Conv", ["r1", "C2", "c2"], ["a2"], pads=[1, 1, 1, 1], strides=[2, 2], group=8),
        n("Relu", ["a2"], ["r2"]),
        n("Conv", ["r2", "C3", "c3"], ["a3"], pads=[2, 2, 2, 2], dilations=[2, 2]),
        n("Relu", ["a3"], ["r3"]),
        n("Flatten", ["r3"], ["f"], axis=1),
        n("Gemm", ["f", "W", "b"], ["y"], transB=1),
    ]
    inits = [
        init("C1", 8, 3, 3, 3), init("c1", 8, s=0.1),
        init("C2", 8, 1, 3, 3), init("c2", 8, s=0.1),
        init("C3", 16, 8, 3, 3, s=0.15), init("c3", 16, s=0.1),
        init("W", 10, 16 * 4 * 4, s=0.1), init("b", 10, s=0.1),
    ]
    return _model(nodes, CNN_SHAPE, (CNN_SHAPE[0], 10), inits)


MODELS = {"mlp": (mlp_model, MLP_SHAPE, 2), "cnn": (cnn_model, CNN_SHAPE, 4)}  # builder, input shape, sites
# ORT per-channel weights are always symmetric (int8: zero point 0, uint8: 128); a non-zero
# int8 weight zero point needs per-tensor weights.
VARIANTS = {
    "s8-sym": dict(activation_type="QInt8", weight_type="QInt8", per_channel=True, extra_options={"ActivationSymmetric": False}),
    "u8-asym": dict(activation_type="QUInt8", weight_type="QInt8", per_channel=False, extra_options={"WeightSymmetric": False}),
    "u8-u8w": dict(activation_type="QUInt8", weight_type="QUInt8", per_channel=True, extra_options={}),
}
# What the pass can tell about the weight zero points: (without params, with params).
WEIGHT_ZP = {"s8-sym": ("runtime", "zero"), "u8-asym": ("nonzero-const", "nonzero-const"), "u8-u8w": ("runtime", "zero")}


def _inputs(shape, n, seed) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def _quantize(model: onnx.ModelProto, shape, variant: str, workdir, after_activations: bool = False) -> onnx.ModelProto:
    """``after_activations``: as edgecomp's int8 pass quantizes (``passes/quantize_int8.py``): a
    conv's own output left float, so a ReLU/Clip after it stays in the graph, ahead of the quantize."""
    q = quant
    src, dst = workdir / "fp32.onnx", workdir / f"{variant}.onnx"
    onnx.save(model, src)

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter({"x": x} for x in _inputs(shape, 16, SEED + 100))

        def get_next(self):
            return next(self.it, None)

    opts = VARIANTS[variant]
    q.quantize_static(
        str(src), str(dst), Reader(),
        quant_format=q.QuantFormat.QDQ, per_channel=opts["per_channel"],
        weight_type=getattr(q.QuantType, opts["weight_type"]), activation_type=getattr(q.QuantType, opts["activation_type"]),
        extra_options={**opts["extra_options"], **({"OpTypesToExcludeOutputQuantization": ["Conv"]} if after_activations else {})},
        **({"op_types_to_quantize": ["Conv"]} if after_activations else {}),
    )
    return onnx.load(dst)


def _strip_output_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its final QuantizeLinear → DequantizeLinear: ``y`` is the fp32 result."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = list(out.graph.node)
    dq = next(n for n in nodes if n.output[0] == "y")
    ql = next(n for n in nodes if n.output[0] == dq.input[0])
    assert (dq.op_type, ql.op_type) == ("DequantizeLinear", "QuantizeLinear")
    producer = next(n for n in nodes if ql.input[0] in n.output)
    producer.output[list(producer.output).index(ql.input[0])] = "y"
    del out.graph.node[:]
    out.graph.node.extend(n for n in nodes if n is not dq and n is not ql)
    return out


def _output_scale(model: onnx.ModelProto) -> float:
    dq = next(n for n in model.graph.node if n.output[0] == "y")
    init = {i.name: i for i in model.graph.initializer}
    return float(numpy_helper.to_array(init[dq.input[1]]))


def _run_tvm(executable, relax_model, xs) -> list[np.ndarray]:
    vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
    params = [tvm.runtime.tensor(p) for p in relax_model.params]
    return [vm["main"](tvm.runtime.tensor(x), *params).numpy() for x in xs]


def _compile(mod, target=HOST):
    return tvm.compile(mod, target=target.tvm(), relax_pipeline=tvm.relax.get_pipeline("default"))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(model name, variant) → ORT QDQ model, built once per module."""
    cache: dict = {}

    def get(name: str, variant: str) -> onnx.ModelProto:
        if (name, variant) not in cache:
            build, shape, _ = MODELS[name]
            cache[name, variant] = _quantize(build(), shape, variant, tmp_path_factory.mktemp(f"{name}-{variant}"))
        return cache[name, variant]

    return get


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_integer_path_is_exact(quantized, name, variant):
    """All three modes (weight-independent, zero points read from params, folded) equal the fp32 path."""
    _, shape, n_sites = MODELS[name]
    model = _strip_output_qdq(quantized(name, variant))
    rm = to_relax(model, {"x": shape}, {"x": "float32"})
    params = dict(zip(rm.param_names, rm.params))
    xs = _inputs(shape, 3, SEED + 7)
    ref = _run_tvm(_compile(rm.mod), rm, xs)
    # Weight-independent code (every zero-point term at run time), zero points read from params,
    # and weight terms folded (what compile_relax(int8_arith=True) compiles).
    # The CNN (slow to compile) runs the modes that add code paths the MLP does not cover.
    modes = ({}, {"params": params}, {"params": params, "fold_weight_terms": True})
    for kwargs in modes if name == "mlp" else {"s8-sym": modes[2:], "u8-asym": modes[::2], "u8-u8w": modes[:1]}[variant]:
        mod, stats = rewrite_int8(rm.mod, **kwargs)
        assert (stats.matched, stats.rewritten) == (n_sites, n_sites), stats.to_json()
        counts = count_int_ops(mod)
        assert counts["int32"] >= n_sites and counts["float32"] == 0, counts
        for site in stats.sites:
            assert site.x_dtype == ("int8" if variant == "s8-sym" else "uint8")
            assert site.weight_zero_point == WEIGHT_ZP[variant][bool(kwargs)], site
            assert site.folded_weight_terms == bool(kwargs.get("fold_weight_terms") and site.act_zero_point)
        assert any(s.act_zero_point for s in stats.sites), "no site exercises the activation zero point"
        got = _run_tvm(_compile(mod), rm, xs)
        for g, r in zip(got, ref):
            assert np.abs(g - r).max() <= 1e-5 * np.abs(r).max(), (kwargs.keys(), np.abs(g - r).max(), np.abs(r).max())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_matches_onnxruntime_int8(quantized, name, variant):
    """compile_relax(int8_arith=True) vs ORT running the same QDQ model with its int8 kernels."""
    _, shape, _ = MODELS[name]
    qmodel = quantized(name, variant)
    rm = to_relax(qmodel, {"x": shape}, {"x": "float32"})
    xs = _inputs(shape, 8, SEED + 11)
    _assert_within_one_step_of_ort(qmodel, xs, np.stack(_run_tvm(compile_relax(rm, HOST, int8_arith=True), rm, xs)))


def _assert_within_one_step_of_ort(qmodel: onnx.ModelProto, xs: list[np.ndarray], got: np.ndarray) -> None:
    """``got`` (stacked outputs for ``xs``) against ORT running the QDQ model with its own int8 kernels:
    at most one output quantization step anywhere, and at least 95% of the elements bit-identical."""
    sess = ort.InferenceSession(qmodel.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = np.stack([sess.run(None, {"x": x})[0] for x in xs])
    steps = np.abs(got - ref) / _output_scale(qmodel)
    assert steps.max() <= 1.0 + 1e-3 and (steps < 1e-3).mean() >= 0.95, (steps.max(), (steps < 1e-3).mean())


def _asm(executable) -> str:
    mods = [executable.mod, *executable.mod.imports]
    return "".join(m.inspect_source("asm") for m in mods if m.kind == "llvm")


def test_arm64_compiles_and_dotprod_gives_sdot(quantized):
    """aarch64: the int8 module compiles; with +dotprod LLVM emits NEON sdot, without it does not.

    Finding (TVM 0.27, untuned code): ``sdot`` comes from LLVM's vectorizer on the Gemm
    (transB) site, whose weight is [N, K] so both operands are contiguous along K; the MatMul
    site ([K, N] weight, strided along K) is vectorized with smull/smlal instead.
    """
    rm = to_relax(quantized("mlp", "s8-sym"), {"x": MLP_SHAPE}, {"x": "float32"})
    mod, stats = rewrite_int8(rm.mod, dict(zip(rm.param_names, rm.params)), fold_weight_terms=True)
    assert stats.rewritten == 2
    dotprod = dict(ARM64.target_dict(), mattr=["+neon", "+dotprod"])
    with_dot = _asm(tvm.compile(mod, target=tvm.target.Target(dotprod), relax_pipeline=tvm.relax.get_pipeline("default")))
    without = _asm(compile_relax(rm, ARM64, int8_arith=True))
    fp32 = _asm(compile_relax(rm, ARM64))
    sdot = re.compile(r"^\s*sdot\s", re.M)
    assert len(sdot.findall(with_dot)) > 0
    assert not sdot.findall(without) and not sdot.findall(fp32)
    # Without dotprod the int8 code still multiplies integers (widening multiply-accumulate into
    # 16/32-bit lanes; a 64-bit destination, .2d, is vectorized index arithmetic, not data).
    data_mac = r"^\s*s(mlal|mull)2?\s+v\d+\.(8h|4s)"
    assert re.search(data_mac, without, re.M)
    assert not re.search(data_mac, fp32, re.M)


def test_skips_sites_it_cannot_rewrite_exactly():
    """A weight quantized along the reduction axis cannot be factored out: left as fp32, with a reason."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 4), "int8"))
    w = relax.Var("w", relax.TensorType((4, 3), "int8"))
    sw = relax.Var("sw", relax.TensorType((4,), "float32"))
    with bb.function("main", [x, w, sw]):
        with bb.dataflow():
            dx = bb.emit(relax.op.dequantize(x, relax.const(0.1, "float32"), relax.const(0, "int8"), axis=1))
            dw = bb.emit(relax.op.dequantize(w, sw, relax.const(0, "int8"), axis=0))  # per-K scale
            y = bb.emit_output(relax.op.matmul(dx, dw))
        bb.emit_func_output(y)
    mod, stats = rewrite_int8(bb.get())
    assert (stats.matched, stats.rewritten) == (1, 0)
    assert "axis" in stats.sites[0].reason
    assert count_int_ops(mod) == {"int32": 0, "float32": 1, "other": 0}


_DEVICE_SCRIPT = """
import sys, numpy as np, tvm
from tvm.runtime import vm
d = np.load(sys.argv[2])
machine = vm.VirtualMachine(tvm.runtime.load_module(sys.argv[1]), tvm.cpu())
args = [tvm.runtime.tensor(d["x"])] + [tvm.runtime.tensor(d["p%d" % i]) for i in range(int(d["n_params"]))]
np.save(sys.argv[3], machine["main"](*args).numpy())
"""


def _emulated(so, rm, x, tmp_path, cpus: tuple[str, ...]) -> dict:
    """Run the aarch64 library ``so`` on ``x`` under qemu-user, once per CPU model in ``cpus``:
    ``{cpu: output array or the failed CompletedProcess}``; skips when the emulator is not set up."""
    import os
    import subprocess

    from edgecomp.errors import EdgecompError
    from edgecomp.targets.devices import emu_info

    try:
        info = emu_info()
    except EdgecompError as err:
        pytest.skip(f"emulated arm64 device not set up: {err}")
    (tmp_path / "run.py").write_text(_DEVICE_SCRIPT)
    np.savez(tmp_path / "in.npz", x=x, n_params=len(rm.params), **{f"p{i}": p for i, p in enumerate(rm.params)})
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1", PYTHONPATH=info["site"], PYTHONNOUSERSITE="1")
    out = {}
    for cpu in cpus:
        cmd = [info["qemu"], "-cpu", cpu, "-L", info["sysroot"], os.path.join(info["sysroot"], info["python"]),
               str(tmp_path / "run.py"), str(so), str(tmp_path / "in.npz"), str(tmp_path / f"{cpu}.npy")]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        out[cpu] = np.load(tmp_path / f"{cpu}.npy") if done.returncode == 0 else done
    return out


def test_arm64_sdot_code_runs_emulated(quantized, tmp_path):
    """The +dotprod library runs on an emulated core with dotprod (qemu ``max``) and gives the host's
    outputs; on a Cortex-A53 (no dotprod) it dies of an illegal instruction: the sdot code is used."""
    import shutil

    from edgecomp.targets.lowering import export_library

    if shutil.which(ARM64.cross_compiler) is None:
        pytest.skip(f"{ARM64.cross_compiler} is not installed")
    qmodel = quantized("mlp", "s8-sym")
    rm = to_relax(qmodel, {"x": MLP_SHAPE}, {"x": "float32"})
    mod, _ = rewrite_int8(rm.mod, dict(zip(rm.param_names, rm.params)), fold_weight_terms=True)
    dotprod = tvm.target.Target(dict(ARM64.target_dict(), mattr=["+neon", "+dotprod"]))
    so = tmp_path / "mlp-int8.so"
    export_library(tvm.compile(mod, target=dotprod, relax_pipeline=tvm.relax.get_pipeline("default")), so, ARM64)
    x = _inputs(MLP_SHAPE, 1, SEED + 13)[0]
    host = _run_tvm(_compile(mod), rm, [x])[0]
    runs = _emulated(so, rm, x, tmp_path, ("max", "cortex-a53"))
    got = runs["max"]
    assert isinstance(got, np.ndarray), got.stderr[-500:]
    assert np.abs(got - host).max() <= _output_scale(qmodel) * (1 + 1e-3)
    assert (got == host).mean() >= 0.95
    no_dotprod = runs["cortex-a53"]
    assert not isinstance(no_dotprod, np.ndarray) and "Illegal instruction" in no_dotprod.stderr, no_dotprod


def test_activation_times_activation_batched_matmul():
    """Both operands computed at run time (attention-like, rank 3), non-zero zero points on both sides."""
    from tvm import relax

    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((2, 3, 8), "int8"))
    b = relax.Var("b", relax.TensorType((2, 8, 5), "uint8"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            da = bb.emit(relax.op.dequantize(a, relax.const(0.05, "float32"), relax.const(-3, "int8"), axis=-1))
            db = bb.emit(relax.op.dequantize(b, relax.const(0.02, "float32"), relax.const(130, "uint8"), axis=-1))
            y = bb.emit_output(relax.op.matmul(da, db))
        bb.emit_func_output(y)
    mod, stats = rewrite_int8(bb.get())
    assert (stats.matched, stats.rewritten) == (1, 1) and stats.sites[0].weight_zero_point == "nonzero-const"
    rng = np.random.default_rng(SEED)
    args = [rng.integers(-128, 128, (2, 3, 8)).astype(np.int8), rng.integers(0, 256, (2, 8, 5)).astype(np.uint8)]
    run = lambda m: relax.VirtualMachine(_compile(m), tvm.cpu())["main"](*map(tvm.runtime.tensor, args)).numpy()  # noqa: E731
    ref = ((args[0].astype(np.float64) + 3) * 0.05) @ ((args[1].astype(np.float64) - 130) * 0.02)
    np.testing.assert_allclose(run(mod), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(run(bb.get()), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# -- Int8Dot: int8 matmuls on the dot-product instruction (x86 VNNI, AArch64 SDOT) -------------

DENSE_SHAPE = (8, 64)


def dense_model(n1: int = 48, n2: int = 32) -> onnx.ModelProto:
    """MatMul [64 → n1] + Relu, then Gemm(transB=1) [n1 → n2]: shapes the dot-product tiles
    take (N a multiple of the lanes, K of 4); both weights are stored [K, N] (the Gemm's transposed at import)."""
    rng = np.random.default_rng(SEED + 2)
    init = lambda name, *shape, s=0.2: numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)  # noqa: E731
    n = helper.make_node
    nodes = [n("MatMul", ["x", "W1"], ["h"]), n("Relu", ["h"], ["r"]), n("Gemm", ["r", "W2", "b2"], ["y"], transB=1)]
    return _model(nodes, DENSE_SHAPE, (DENSE_SHAPE[0], n2), [init("W1", 64, n1), init("W2", n2, n1), init("b2", n2, s=0.1)])


VNNI_TARGET = {"kind": "llvm", "mcpu": "cascadelake"}  # AVX-512 VNNI


def _int8_kernels(report: dict) -> dict:
    return {k: v for k, v in report.items() if "matmul" in k}


@pytest.mark.parametrize("variant,widths", [("s8-sym", (48, 32)), ("u8-asym", (48, 32)), ("u8-asym", (24, 40))])
def test_int8_dot_vnni(tmp_path, variant, widths):
    """On a VNNI target both int8 matmuls (MatMul and Gemm) are Int8Dot kernels, the code
    holds vpdpbusd (its 256-bit form for N = 24 and 40, multiples of 8 but not of 16), and (where
    this CPU has VNNI) the outputs match ORT's int8 model within one output step, and the same
    model compiled without VNNI (int32 lanes) exactly."""
    from edgecomp.targets.cpu_schedules import int8_dot, schedule_report
    from edgecomp.targets.lowering import cpu_pipeline, prepare_module

    qmodel = _quantize(dense_model(*widths), DENSE_SHAPE, variant, tmp_path)
    rm = to_relax(qmodel, {"x": DENSE_SHAPE}, {"x": "float32"})
    tvm_vnni = tvm.target.Target(VNNI_TARGET)
    assert int8_dot(tvm_vnni) == ("dot_16x4_vnni", 16, "uint8")
    mod = rewrite_int8(rm.mod, dict(zip(rm.param_names, rm.params)), fold_weight_terms=True, unsigned_activations=True)[0]
    report = _int8_kernels(schedule_report(mod, tvm_vnni))
    assert len(report) == 2 and set(report.values()) == {"Int8Dot"}, report
    asm = _asm(tvm.compile(mod, target=tvm_vnni, relax_pipeline=cpu_pipeline(tvm_vnni)))
    assert re.search(r"^\s*vpdpbusd\s", asm, re.M)
    narrow = any(w % 16 for w in widths)
    assert bool(re.search(r"^\s*vpdpbusd\s.*%ymm", asm, re.M)) == narrow
    assert bool(re.search(r"^\s*vpdpbusd\s.*%zmm", asm, re.M)) != narrow
    if int8_dot(HOST.tvm()) != int8_dot(tvm_vnni):
        pytest.skip("this CPU has no AVX-512 VNNI: compiled, not run")
    # what the build compiles (kernel names differ: fold_epilogues folded the bias dequantize)
    assert sorted(_int8_kernels(schedule_report(prepare_module(rm, HOST, int8_arith=True), HOST.tvm())).values()) == ["Int8Dot"] * 2
    xs = _inputs(DENSE_SHAPE, 6, SEED + 17)
    got = np.stack(_run_tvm(compile_relax(rm, HOST, int8_arith=True), rm, xs))
    _assert_within_one_step_of_ort(qmodel, xs, got)
    plain = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})  # AVX-512, no VNNI: Contraction
    assert int8_dot(plain) is None
    no_dot = rewrite_int8(rm.mod, dict(zip(rm.param_names, rm.params)), fold_weight_terms=True)[0]
    assert set(_int8_kernels(schedule_report(no_dot, plain)).values()) == {"Contraction"}
    other = np.stack(_run_tvm(tvm.compile(no_dot, target=plain, relax_pipeline=cpu_pipeline(plain)), rm, xs))
    assert np.array_equal(got, other)


@pytest.mark.parametrize("name", ["dense", "residual"])
def test_int8_dot_sdot_runs_emulated(tmp_path, name):
    """arm64 with +dotprod (Cortex-A76 preset): the int8 matmuls (dense: MatMul and Gemm; residual:
    the NHWC 1x1 conv) are Int8Dot kernels on ``sdot`` (int8 × int8: the activations stay signed),
    and the library run on an emulated v8.2 core matches this machine's int8 code within one
    output step."""
    import shutil

    from edgecomp.targets import get_target
    from edgecomp.targets.cpu_schedules import int8_dot, schedule_report
    from edgecomp.targets.lowering import export_library, prepare_module

    a76 = get_target("arm64-a76")
    assert int8_dot(a76.tvm()) == ("dot_4x4_i8i8s32_sdot", 4, "int8")
    shape = DENSE_SHAPE if name == "dense" else (1, 8, 6, 6)
    qmodel = _quantize(dense_model() if name == "dense" else residual_model(), shape, "u8-asym", tmp_path)
    rm = to_relax(qmodel, {"x": shape}, {"x": "float32"}, channels_last_convs=True, int8_arith=True)
    report = schedule_report(prepare_module(rm, a76, int8_arith=True), a76.tvm())
    if name == "dense":
        report = _int8_kernels(report)
        assert len(report) == 2 and set(report.values()) == {"Int8Dot"}, report
    else:  # the 1x1 conv (8 → 16 channels) on sdot; the 3x3 conv and the zero-point window sums in int32 lanes
        assert "Int8Dot" in report.values(), report
    executable = compile_relax(rm, a76, int8_arith=True)
    assert re.search(r"^\s*sdot\s", _asm(executable), re.M)
    if shutil.which(a76.cross_compiler) is None:
        pytest.skip(f"{a76.cross_compiler} is not installed")
    so = tmp_path / "dense-int8.so"
    export_library(executable, so, a76)
    x = _inputs(shape, 1, SEED + 19)[0]
    host = _run_tvm(compile_relax(rm, HOST, int8_arith=True), rm, [x])[0]
    got = _emulated(so, rm, x, tmp_path, ("cortex-a76",))["cortex-a76"]
    assert isinstance(got, np.ndarray), got.stderr[-500:]
    assert np.abs(got - host).max() <= _output_scale(qmodel) * (1 + 1e-3)
    assert (got == host).mean() >= 0.95


def residual_model() -> onnx.ModelProto:
    """Conv 1x1 → Relu → Conv 3x3 (pad 1) → Add(input): the second conv's kernel reads a
    dequantized residual beside its own input, and its input is padded with the zero point."""
    rng = np.random.default_rng(SEED + 3)
    init = lambda name, *shape, s=0.3: numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)  # noqa: E731
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "C1", "c1"], ["a1"]),
        n("Relu", ["a1"], ["r1"]),
        n("Conv", ["r1", "C2", "c2"], ["a2"], pads=[1, 1, 1, 1]),
        n("Add", ["a2", "x"], ["y"]),
    ]
    return _model(nodes, (1, 8, 6, 6), (1, 8, 6, 6), [init("C1", 16, 8, 1, 1), init("c1", 16, s=0.1),
                                                      init("C2", 8, 16, 3, 3, s=0.1), init("c2", 8, s=0.1)])


def test_int8_residual_and_pad_kernels_are_scheduled(tmp_path):
    """Every kernel of an int8 residual block gets a default schedule (the conv whose epilogue adds a
    dequantized residual included: the side input is inlined into the epilogue), and the code
    matches ORT's int8 model within one output step."""
    from edgecomp.targets.cpu_schedules import schedule_report
    from edgecomp.targets.lowering import prepare_module

    shape = (1, 8, 6, 6)
    qmodel = _quantize(residual_model(), shape, "u8-asym", tmp_path)
    rm = to_relax(qmodel, {"x": shape}, {"x": "float32"})
    report = schedule_report(prepare_module(rm, HOST, int8_arith=True), HOST.tvm())
    convs = {k: v for k, v in report.items() if "conv2d" in k}
    assert len(convs) >= 2 and set(convs.values()) == {"Contraction"}, report  # (+ the weight zero point's window sums)
    assert any("dequantize" in k for k in convs), report  # the residual's dequantize is in a conv's kernel
    assert all(v != "none" for k, v in report.items() if "pad" in k), report
    xs = _inputs(shape, 4, SEED + 23)
    got = np.stack(_run_tvm(compile_relax(rm, HOST, int8_arith=True), rm, xs))
    _assert_within_one_step_of_ort(qmodel, xs, got)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", ["cnn", "residual"])
def test_channels_last_int8_matches_onnxruntime(quantized, tmp_path, name, variant):
    """What ``edgecomp build --int8-arith`` compiles for a CPU: the activations' quantize/dequantize
    written out elementwise, convs NHWC/HWIO (no transposes left around them), then the int8 rewrite
    on the NHWC convs; within one output step of ORT's int8 model."""
    from tvm import relax

    if name == "residual":
        shape, qmodel = (1, 8, 6, 6), _quantize(residual_model(), (1, 8, 6, 6), variant, tmp_path)
    else:
        shape, qmodel = CNN_SHAPE, quantized(name, variant)
    rm = to_relax(qmodel, {"x": shape}, {"x": "float32"}, channels_last_convs=True, int8_arith=True)
    convs, permutes = [], []

    def visit(expr) -> None:
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.nn.conv2d":
            convs.append(str(expr.attrs.data_layout))
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.permute_dims":
            permutes.append(expr)

    relax.analysis.post_order_visit(rm.mod["main"].body, visit)
    assert convs and set(convs) == {"NHWC"}
    # activations transposed at run time: the input (once per consumer: residual's conv and add) and the output
    assert len([p for p in permutes if len(p.ty.shape) == 4 and int(p.ty.shape[1]) > 1]) <= 3
    mod, stats = rewrite_int8(rm.mod, dict(zip(rm.param_names, rm.params)), fold_weight_terms=True)
    assert stats.rewritten == stats.matched == MODELS.get(name, (None, None, 2))[2], stats.to_json()
    xs = _inputs(shape, 6, SEED + 29)
    got = np.stack(_run_tvm(compile_relax(rm, HOST, int8_arith=True), rm, xs))
    _assert_within_one_step_of_ort(qmodel, xs, got)


def relu6_chain_model() -> onnx.ModelProto:
    """Conv 1x1 → Clip(0, 6) → Conv 3x3 (pad 1) → Clip(0, 6) → Conv 1x1 → Relu: MobileNetV2's
    epilogues (a ReLU6 ahead of each requantize, each output shifted into the next conv's domain)."""
    rng = np.random.default_rng(SEED + 5)
    init = lambda name, *shape, s=0.3: numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)  # noqa: E731
    lim = [numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")]
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "C1", "c1"], ["a1"]), n("Clip", ["a1", "lo", "hi"], ["r1"]),
        n("Conv", ["r1", "C2", "c2"], ["a2"], pads=[1, 1, 1, 1]), n("Clip", ["a2", "lo", "hi"], ["r2"]),
        n("Conv", ["r2", "C3", "c3"], ["a3"]), n("Relu", ["a3"], ["y"]),
    ]
    inits = [init("C1", 16, 8, 1, 1), init("c1", 16, s=0.5), init("C2", 16, 16, 3, 3, s=0.1), init("c2", 16, s=0.5),
             init("C3", 16, 16, 1, 1, s=0.2), init("c3", 16, s=0.1), *lim]
    return _model(nodes, (1, 8, 6, 6), (1, 16, 6, 6), inits)


@pytest.mark.parametrize("variant", ["s8-sym", "u8-asym"])
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("name", ["relu6-chain", "residual"])
def test_fold_epilogues_is_exact(tmp_path, variant, unsigned, name):
    """fold_epilogues (ReLU/ReLU6 into the requantize clamp, the domain shift into the quantize,
    for a tensor also read by a residual's dequantize too, int32 bias dequantize into constants)
    gives bit-identical outputs with fewer elementwise ops."""
    from tvm import relax

    from edgecomp.targets.int8 import fold_epilogues

    shape = (1, 8, 6, 6)
    build = relu6_chain_model if name == "relu6-chain" else residual_model
    qmodel = _quantize(build(), shape, variant, tmp_path, after_activations=True)
    rm = to_relax(qmodel, {"x": shape}, {"x": "float32"}, channels_last_convs=True, int8_arith=True)
    params = dict(zip(rm.param_names, rm.params))
    mod, stats = rewrite_int8(rm.mod, params, fold_weight_terms=True, unsigned_activations=unsigned)
    assert stats.rewritten == stats.matched == (3 if name == "relu6-chain" else 2), stats.to_json()
    folded = fold_epilogues(mod, params)

    def ops(m) -> dict:
        seen: dict = {}

        def visit(expr) -> None:
            if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
                key = expr.op.name if expr.op.name != "relax.astype" else f"astype:{expr.attrs.dtype}"
                seen[key] = seen.get(key, 0) + 1

        relax.analysis.post_order_visit(m["main"].body, visit)
        return seen

    before, after = ops(mod), ops(folded)
    if name == "relu6-chain":
        # both ReLU6 clamps gone into the requantizes after them (the final ReLU feeds the float
        # output: nothing to fold into); no bias dequantize left
        assert after.get("relax.minimum", 0) == before["relax.minimum"] - 2, (before, after)
        assert after.get("relax.maximum", 0) == before["relax.maximum"] - 2, (before, after)
        assert before.get("relax.dequantize", 0) >= 3 and after.get("relax.dequantize", 0) == before["relax.dequantize"] - 3
        # the 3x3 conv reads a ReLU6 output: zero point 0 in the uint8 domain, so its padding is
        # the conv's own (in its kernel), not a pad op
        assert before.get("relax.nn.pad", 0) == (0 if unsigned else 1), before
    # the domain shift of each conv input (int8 activations into uint8 for VNNI, uint8 into int8
    # for SDOT) is folded into the quantize that produced it, the model input's one included
    # (in the residual model also read by the residual add's dequantize, which takes the shifted
    # zero point)
    if (variant == "s8-sym") == unsigned:
        assert before["astype:int16"] >= 2 and after.get("astype:int16", 0) == 0, (before, after)
    xs = _inputs(shape, 4, SEED + 31)
    ref = _run_tvm(_compile(mod), rm, xs)
    got = _run_tvm(_compile(folded), rm, xs)
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)


@pytest.mark.parametrize("a,b,s,z", [
    (0.0, 6.0, 0.05, -128.0),   # ReLU6 into an int8 requantize: folds
    (3.0, 1.0, 0.05, 0.0),      # an empty clamp (a > b): every output is b, left alone
    (2.0, 6.0, 0.01, 0.0),      # round(a/s)+z = 200 > 127: the clamp range quantizes outside int8, left alone
])
def test_fold_epilogues_clamp_edge_cases(a, b, s, z):
    """The clamp fold on hand-written requantizes (minimum(maximum(y, a), b) then the written-out
    quantize), at inputs on and around every rounding tie: the same int8 values as unfolded."""
    from tvm import relax

    from edgecomp.targets.int8 import fold_epilogues

    R = relax.op
    f32 = lambda v: relax.const(np.float32(v), "float32")  # noqa: E731
    bb = relax.BlockBuilder()
    y = relax.Var("y", relax.TensorType((4096,), "float32"))
    with bb.function("main", [y]):
        with bb.dataflow():
            c = bb.emit(R.minimum(bb.emit(R.maximum(y, f32(a))), f32(b)))
            r = bb.emit(R.add(bb.emit(R.round(bb.emit(R.divide(c, f32(s))))), f32(z)))
            q = bb.emit_output(R.astype(bb.emit(R.maximum(bb.emit(R.minimum(r, f32(127))), f32(-128))), "int8"))
        bb.emit_func_output(q)
    mod = bb.get()
    folded = fold_epilogues(mod, {})
    def minimums(m) -> int:
        found = []
        relax.analysis.post_order_visit(m["main"].body, lambda e: found.append(
            isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.minimum"))
        return sum(found)

    folds = a <= b and np.rint(np.float32(a) / np.float32(s)) + z <= 127
    assert (minimums(mod), minimums(folded)) == (2, 1 if folds else 2)
    xs = (np.arange(4096, dtype=np.float32) - 2048) * np.float32(s / 4)  # every quarter step: ties included
    run = lambda m: tvm.relax.VirtualMachine(_compile(m), tvm.cpu())["main"](tvm.runtime.tensor(xs)).numpy()  # noqa: E731
    np.testing.assert_array_equal(run(folded), run(mod))


def test_reciprocal_scales_and_vector_rounding():
    """reciprocal_scales turns a written-out quantize's division into a multiplication by 1/s
    (within one step of dividing, the same bits away from rounding ties), and the CPU build rounds
    16 lanes at a time (``vrndscaleps`` on zmm: TIR's nearbyint marked vectorizable) with numpy's
    bits."""
    from tvm import relax

    from edgecomp.targets.cpu_schedules import int8_dot
    from edgecomp.targets.int8 import reciprocal_scales, written_quantize
    from edgecomp.targets.lowering import cpu_pipeline, vectorizable_rounding

    s, z = np.float32(0.0235), np.float32(-3.0)
    bb = relax.BlockBuilder()
    y = relax.Var("y", relax.TensorType((4096,), "float32"))
    with bb.function("main", [y]):
        with bb.dataflow():
            q = bb.emit_output(written_quantize(y, relax.const(s), relax.const(z), 127.0, -128.0, "int8"))
        bb.emit_func_output(q)
    mod = bb.get()
    fast = reciprocal_scales(mod)

    def ops(m) -> set:
        found = set()
        relax.analysis.post_order_visit(m["main"].body, lambda e: isinstance(e, relax.Call) and found.add(e.op.name))
        return found

    assert "relax.divide" in ops(mod) and "relax.divide" not in ops(fast) and "relax.multiply" in ops(fast)
    vectorizable_rounding()  # (prepare_module does this before every build)
    avx512 = tvm.target.Target(VNNI_TARGET)
    executable = tvm.compile(fast, target=avx512, relax_pipeline=cpu_pipeline(avx512))
    assert re.search(r"^\s*vrndscaleps\s.*%zmm", _asm(executable), re.M)
    if int8_dot(HOST.tvm()) != int8_dot(avx512):
        pytest.skip("this CPU has no AVX-512 VNNI: compiled, not run")
    run = lambda e, x: tvm.relax.VirtualMachine(e, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy().astype(int)  # noqa: E731
    divided = _compile(mod)
    ties = (np.arange(4096, dtype=np.float32) - 2048) * (s / np.float32(2))  # on and around every .5 tie
    noise = np.random.default_rng(SEED + 41).uniform(-3.5, 3.5, 4096).astype(np.float32)
    for x in (ties, noise):
        got = run(executable, x)
        np.testing.assert_array_equal(got, np.clip(np.rint(x * (np.float32(1) / s)) + z, -128, 127))
        assert np.abs(got - run(divided, x)).max() <= 1
    assert np.array_equal(run(executable, noise), run(divided, noise))
