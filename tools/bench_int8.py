"""Does int8 arithmetic pay? fp32 vs QDQ (dequantize → fp32) vs the int8 rewrite, host CPU and arm64.

    pip install -e ".[tune]"                         # MetaSchedule's own dependencies (xgboost, ...)
    python tools/bench_int8.py                       # MLPs b1/b32 + digits CNN; MetaSchedule 16 trials/kernel on the MLPs
    python tools/bench_int8.py --trials 0            # untuned and dlight only (a few minutes)
    python tools/bench_int8.py --report-only bench/results/int8-<date>.json
    python tools/bench_int8.py --coverage-only bench/results/int8-<date>.json   # recompute dlight coverage, time nothing

Same process, same run, one thread everywhere (``TVM_NUM_THREADS=1``, ORT intra/inter-op 1):

- ``ort-fp32`` / ``ort-int8``: ONNX Runtime on the fp32 model / on its own ``quantize_static``
  QDQ model (per-channel int8 weights, int8 activations, fully optimized: ORT fuses the QDQ
  pattern into its int8 kernels);
- ``tvm-fp32``, ``tvm-qdq`` (the importer's dequantize → fp32 path), ``tvm-int8`` (the QDQ model
  after ``edgecomp.targets.int8.rewrite_int8``, weight terms folded: what
  ``compile_relax(int8_arith=True)`` builds) and ``tvm-int8-generic`` (the weight-independent
  rewrite: every zero-point term computed at run time), each compiled three ways: ``default``
  (``tvm.compile``'s default pipeline: one kernel per op, no CPU schedules), ``fused+dlight``
  (TVM's CPU backend pipeline, which fuses ops, plus the ``tvm.s_tir.dlight`` CPU rules GEMV and
  Reduction), and ``metaschedule`` (fp32 and int8 only, MLP only, ``--trials`` per kernel).

Latency: median of ``--reps``-bounded repeats after warm-up, per call of ``main`` (one batch).
Accuracy: against ORT fp32 on held-out inputs (digits: top-1 on its test split), and for the
int8 variants the largest difference from ORT int8 in output quantization steps. arm64: every
TVM variant compiled for ``aarch64-linux-gnu`` with ``+neon`` and ``+neon,+dotprod``; the
generated assembly is searched for ``sdot`` (and widening ``smlal``/``smull``, ``fmla``).
Writes bench/results/int8-<date>.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "edgecomp" / "examples" / "digits"
MLP_DIMS = (784, 1024, 1024, 10)
TVM_VARIANTS = ("tvm-fp32", "tvm-qdq", "tvm-int8", "tvm-int8-generic")


# ------------------------------------------------------------------------------------- models
def mlp_model(batch: int, form: str = "matmul"):
    """784-1024-1024-10 ReLU MLP, He-scaled Gaussian weights (seed 0), static batch.

    ``form="matmul"``: MatMul with a [K, N] weight + Add (weights stored the way the matmul reads
    them); ``form="gemm"``: Gemm(transB=1) with a [N, K] weight, as torch.onnx exports
    ``nn.Linear``: TVM's importer makes that ``permute_dims(W)``, a transpose of the weight on
    every call.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, cur = [], [], "x"
    for i, (fan_in, fan_out) in enumerate(zip(MLP_DIMS[:-1], MLP_DIMS[1:])):
        w = (rng.standard_normal((fan_out, fan_in)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        b = (0.05 * rng.standard_normal(fan_out)).astype(np.float32)
        last = i == len(MLP_DIMS) - 2
        out = "y" if last else f"g{i}"
        inits.append(numpy_helper.from_array(b, f"b{i}"))
        if form == "gemm":
            inits.append(numpy_helper.from_array(w, f"W{i}"))
            nodes.append(helper.make_node("Gemm", [cur, f"W{i}", f"b{i}"], [out], transB=1, name=f"fc{i}"))
        else:
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"W{i}"))
            nodes.append(helper.make_node("MatMul", [cur, f"W{i}"], [f"m{i}"], name=f"fc{i}"))
            nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [out], name=f"bias{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"h{i}"], name=f"relu{i}"))
            cur = f"h{i}"
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, MLP_DIMS[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, MLP_DIMS[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _models(workdir: Path):
    """name → (fp32 path, input name, input shape, calib feeds, eval feeds, eval labels or None)."""
    import numpy as np
    import onnx

    out = {}
    for form in ("matmul", "gemm"):
        for batch in (1, 32):
            rng = np.random.default_rng(1)
            path = workdir / f"mlp-{form}-b{batch}.onnx"
            onnx.save(mlp_model(batch, form), path)
            # Inputs in [0, 1) like image pixels; calibration and evaluation sets are disjoint draws.
            calib = [{"x": rng.random((batch, MLP_DIMS[0]), dtype=np.float32)} for _ in range(max(2, 64 // batch))]
            evals = [{"x": rng.random((batch, MLP_DIMS[0]), dtype=np.float32)} for _ in range(max(2, 64 // batch))]
            out[f"mlp-{form} 784-1024-1024-10 b{batch}"] = (path, "x", (batch, MLP_DIMS[0]), calib, evals, None)
    meta = json.loads((DIGITS / "meta.json").read_text())
    name = meta["input_name"]
    shape = tuple(meta["shape"][name])
    calib = np.load(DIGITS / "calib.npz")["x"]
    test = np.load(DIGITS / "test.npz")
    out["digits-cnn b1"] = (
        DIGITS / meta["model"], name, shape,
        [{name: calib[i : i + 1]} for i in range(len(calib))],
        [{name: test["x"][i : i + 1]} for i in range(len(test["x"]))],
        test["y"],
    )
    return out


def _quantize(src: Path, dst: Path, calib: list[dict]) -> None:
    """ORT static QDQ quantization with the settings of the main benchmark's ``ort-int8``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    pre = dst.with_name(dst.stem + ".pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    quantize_static(
        str(pre), str(dst), Reader(),
        quant_format=QuantFormat.QDQ, per_channel=True,
        weight_type=QuantType.QInt8, activation_type=QuantType.QInt8,
        op_types_to_quantize=["Conv", "MatMul", "Gemm"],
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
    )
    pre.unlink()


# ---------------------------------------------------------------------------------- compiling
def _pipeline(kind: str, target):
    """``default``: ``tvm.compile``'s default pipeline (legalize, no fusion, no schedules);
    ``fused+dlight``: TVM's CPU pipeline (legalize → FuseOps → FuseTIR) plus dlight's CPU rules."""
    import tvm
    from tvm import relax

    if kind == "default":
        return relax.get_pipeline("default")
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import dlight as dl

    @tvm.transform.module_pass(opt_level=0)
    def dlight_pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(
                cpu.library_dispatch_passes(target)
                + cpu.legalize_passes(target)
                + [dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction())]
                + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
            )(mod)

    return dlight_pipeline


def _dlight_coverage(mod, target) -> tuple[int, int]:
    """(kernels dlight scheduled, kernels) of a module after the default legalization + fusion."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import dlight as dl

    with target:
        fused = tvm.transform.Sequential(cpu.library_dispatch_passes(target) + cpu.legalize_passes(target))(mod)
        done = dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction())(fused)
    funcs = [f for _, f in done.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    return sum(bool(f.attrs and f.attrs.get("tirx.is_scheduled")) for f in funcs), len(funcs)


def _coverage(variants: dict, target) -> dict[str, str]:
    """config → "S of N kernels" (:func:`_dlight_coverage`) for the ``variants`` of :func:`_variants`."""
    return {v: "%d of %d kernels" % _dlight_coverage(mod, target) for v, (mod, _) in variants.items()}


def _tune(mod, target, trials: int, work_dir: Path):
    """MetaSchedule-tune every kernel of ``mod`` with ``trials`` trials each; compile with the database."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    with target:
        zero = relax.get_pipeline("zero")(mod)
    n_tasks = len(ms.relax_integration.extract_tasks(zero, target))
    ms.relax_integration.tune_relax(
        zero, params={}, target=target, work_dir=str(work_dir),
        max_trials_global=trials * n_tasks, max_trials_per_task=trials, num_trials_per_iter=trials,
        # The first TIR build in a worker imports tensor_intrin (30-45 s): warm it in the
        # initializer (a partial of importlib, so that it pickles by reference from anywhere).
        builder=ms.builder.LocalBuilder(initializer=functools.partial(importlib.import_module, "tvm.s_tir.tensor_intrin"), timeout_sec=240),
        runner=ms.runner.LocalRunner(timeout_sec=60, evaluator_config=ms.runner.EvaluatorConfig(number=5, repeat=1, min_repeat_ms=20)),
        seed=0,
    )
    tuned = relax.get_pipeline("static_shape_tuning", total_trials=0, target=target, work_dir=str(work_dir))(mod)
    return tvm.compile(tuned, target=target)


def _tuned_kernels(work_dir: Path) -> dict[str, float]:
    """Kernel → latency (µs) from MetaSchedule's last task table (its own measurement)."""
    log = work_dir / "logs" / "tvm.s_tir.meta_schedule.logging.task_scheduler.log"
    table: dict[str, float] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 9 and cells[0].isdigit():
            try:
                table[cells[1]] = float(cells[5])
            except ValueError:  # "N/A": not measured
                table[cells[1]] = float("nan")
    return table


# --------------------------------------------------------------------------------- measuring
def _latency(run, budget_s: float, max_reps: int) -> dict:
    from edgecomp.bench.runner import measure_latency

    t0 = time.perf_counter()
    run()
    once = time.perf_counter() - t0
    reps = int(min(max_reps, max(10, budget_s / max(once, 1e-6))))
    return measure_latency(run, reps=reps, warmup=3)


def _accuracy(outputs, ref_fp32, ref_int8, labels, step) -> dict:
    import numpy as np

    got, fp = np.concatenate(outputs), np.concatenate(ref_fp32)
    flat_g, flat_f = got.reshape(len(got), -1), fp.reshape(len(fp), -1)
    cos = (flat_g * flat_f).sum(1) / (np.linalg.norm(flat_g, axis=1) * np.linalg.norm(flat_f, axis=1) + 1e-30)
    acc = {"min_cosine_vs_fp32": float(cos.min()), "top1_agree_fp32": float((got.argmax(-1) == fp.argmax(-1)).mean())}
    if labels is not None:
        acc["top1_accuracy"] = float((got.argmax(-1).ravel() == labels).mean())
    if ref_int8 is not None:
        acc["max_steps_vs_ort_int8"] = float(np.abs(got - np.concatenate(ref_int8)).max() / step)
    return acc


def _asm_counts(executable) -> dict:
    asm = "".join(m.inspect_source("asm") for m in [executable.mod, *executable.mod.imports] if m.kind == "llvm")
    counts = {op: len(re.findall(rf"^\s*{op}\s", asm, re.M)) for op in ("sdot", "udot", "fmla")}
    counts["smlal/smull"] = len(re.findall(r"^\s*s(?:mlal|mull)2?\s", asm, re.M))
    kernels, fn = set(), None
    for line in asm.splitlines():
        m = re.match(r"^([A-Za-z_][\w.]*):", line)
        if m:
            fn = m.group(1)
        elif re.match(r"^\s*sdot\s", line):
            kernels.add(fn)
    counts["sdot_kernels"] = sorted(k for k in kernels if k)
    return counts


# Runs under qemu-aarch64 in the emulated arm64 device's Python (TVM runtime only).
_DEVICE_SCRIPT = """
import sys, numpy as np, tvm
from tvm.runtime import vm
d = np.load(sys.argv[2])
machine = vm.VirtualMachine(tvm.runtime.load_module(sys.argv[1]), tvm.cpu())
args = [tvm.runtime.tensor(d["x"])] + [tvm.runtime.tensor(d["p%d" % i]) for i in range(int(d["n_params"]))]
np.save(sys.argv[3], machine["main"](*args).numpy())
"""


def _emulate(so: Path, x, params, qemu_cpu: str, work: Path) -> dict:
    """Run an aarch64 library on the emulated device (qemu-aarch64 -cpu ``qemu_cpu``): output or error."""
    import subprocess

    import numpy as np

    from edgecomp.targets.devices import emu_info

    try:
        info = emu_info()
    except Exception as err:  # not set up: a result, not a crash
        return {"error": str(err)}
    script, feed, out = work / "device_run.py", work / f"{so.stem}-in.npz", work / f"{so.stem}-{qemu_cpu}-out.npy"
    script.write_text(_DEVICE_SCRIPT)
    np.savez(feed, x=x, n_params=len(params), **{f"p{i}": p for i, p in enumerate(params)})
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1", PYTHONPATH=info["site"], PYTHONNOUSERSITE="1")
    cmd = [info["qemu"], "-cpu", qemu_cpu, "-L", info["sysroot"], str(Path(info["sysroot"]) / info["python"]), str(script), str(so), str(feed), str(out)]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        return {"error": f"exit {r.returncode}: {lines[-1][:200] if lines else ''}"}
    return {"output": np.load(out)}


def _machine() -> dict:
    cpu = platform.machine()
    flags: list[str] = []
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = sorted({f for f in line.split(":", 1)[1].split() if re.search(r"vnni|amx|avx512f|avx2|fma", f)})
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "isa_flags": flags}


def run(args) -> dict:
    """The whole benchmark in this process; the results document."""
    import tvm

    from edgecomp.targets.host import HOST
    from edgecomp.versions import package_versions

    host = tvm.target.Target(dict(HOST.target_dict(), **{"num-cores": 1}))
    doc = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": _machine(),
        "tvm_target": str(host),
        "threads": 1,
        "tools": package_versions(["apache-tvm", "apache-tvm-ffi", "onnxruntime", "onnx", "numpy"]),
        "rows": [],
        "arm64": [],
        "notes": [],
    }
    work = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    try:
        _run_models(args, doc, work, host)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return doc


def _variants(name: str, entry: tuple, work: Path):
    """Quantize one model of :func:`_models` and build the TVM variants the benchmark measures.

    Returns (QDQ model path, QDQ model, config → (Relax module, RelaxModel whose params it takes),
    the int8 rewrite's statistics).
    """
    import onnx

    from edgecomp.targets.int8 import rewrite_int8
    from edgecomp.targets.lowering import to_relax

    fp32_path, in_name, shape, calib = entry[:4]
    q_path = work / (re.sub(r"\W+", "-", name) + "-int8.onnx")
    _quantize(Path(fp32_path), q_path, calib)
    q_model = onnx.load(q_path)
    rf = to_relax(onnx.load(fp32_path), {in_name: shape}, {in_name: "float32"})
    rq = to_relax(q_model, {in_name: shape}, {in_name: "float32"})
    qparams = dict(zip(rq.param_names, rq.params))
    mod_int8, stats = rewrite_int8(rq.mod, qparams, fold_weight_terms=True)
    mod_generic, _ = rewrite_int8(rq.mod)
    variants = {"tvm-fp32": (rf.mod, rf), "tvm-qdq": (rq.mod, rq), "tvm-int8": (mod_int8, rq), "tvm-int8-generic": (mod_generic, rq)}
    return q_path, q_model, variants, stats


def recompute_coverage(doc: dict) -> None:
    """Recompute ``doc["dlight_coverage"]`` for every model in it, for its recorded TVM target; no timing.

    The modules are rebuilt as the benchmark builds them; the int8 rewrite's statistics must match
    the recorded ones (else these are not the modules that were measured). Adds a note saying so.
    """
    import tvm

    target = tvm.target.Target(json.loads(doc["tvm_target"]))
    work = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    try:
        models = _models(work)
        for name in doc["dlight_coverage"]:
            print(f"[{name}] dlight coverage", file=sys.stderr)
            *_, variants, stats = _variants(name, models[name], work)
            if json.loads(json.dumps(stats.to_json())) != doc["rewrite"][name]:
                raise SystemExit(f"[{name}] the int8 rewrite differs from the recorded one: {stats.to_json()}")
            doc["dlight_coverage"][name] = _coverage(variants, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc["notes"] = [n for n in doc.get("notes", []) if not n.startswith("The `dlight CPU rules scheduled` lines were recomputed")]
    doc["notes"].append(
        f"The `dlight CPU rules scheduled` lines were recomputed on {datetime.date.today().isoformat()} "
        "(`tools/bench_int8.py --coverage-only`: the same modules rebuilt, nothing timed); every timing and "
        "every other number is from the original run."
    )


def _run_models(args, doc: dict, work: Path, host) -> None:
    import numpy as np
    import onnxruntime as ort
    import tvm
    from tvm import relax

    from edgecomp.targets.arm_cpu import ARM64
    from edgecomp.targets.lowering import elf_arch, export_library

    models = _models(work)
    selected = [m for m in models if any(s in m for s in args.models.split(","))]
    for name in selected:
        fp32_path, in_name, shape, calib, evals, labels = models[name]
        print(f"[{name}] quantizing", file=sys.stderr)
        q_path, q_model, variants, stats = _variants(name, models[name], work)
        step = _out_step(q_model)

        def ort_sess(path):
            o = ort.SessionOptions()
            o.intra_op_num_threads = o.inter_op_num_threads = 1
            return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])

        ort_runs = {"ort-fp32": ort_sess(fp32_path), "ort-int8": ort_sess(q_path)}
        ref = {k: [s.run(None, f)[0] for f in evals] for k, s in ort_runs.items()}
        feed0 = evals[0]
        rows = []
        for config, sess in ort_runs.items():
            lat = _latency(lambda s=sess: s.run(None, feed0), args.budget, args.reps)
            acc = _accuracy(ref[config], ref["ort-fp32"], ref["ort-int8"] if config == "ort-int8" else None, labels, step)
            rows.append({"model": name, "config": config, "schedule": "ort", "latency": lat, "accuracy": acc})

        doc.setdefault("rewrite", {})[name] = stats.to_json()
        doc.setdefault("dlight_coverage", {})[name] = _coverage(variants, host)

        host_out0 = None
        schedules = ["default", "fused+dlight"] + (["metaschedule"] if args.trials > 0 and name.startswith("mlp") else [])
        for schedule in schedules:
            for config, (mod, rm) in variants.items():
                if schedule == "metaschedule" and config not in ("tvm-fp32", "tvm-int8"):
                    continue
                print(f"[{name}] {config} {schedule}", file=sys.stderr)
                t0 = time.perf_counter()
                try:
                    if schedule == "metaschedule":
                        ms_dir = work / "ms" / re.sub(r"\W+", "-", f"{name}-{config}")
                        ex = _tune(mod, host, args.trials, ms_dir)
                    else:
                        ex = tvm.compile(mod, target=host, relax_pipeline=_pipeline(schedule, host))
                except Exception as err:  # a failed build is a result, not a crash
                    rows.append({"model": name, "config": config, "schedule": schedule, "error": str(err).strip().splitlines()[-1][:300]})
                    continue
                build_s = time.perf_counter() - t0
                vm = relax.VirtualMachine(ex, tvm.cpu())
                params = [tvm.runtime.tensor(p) for p in rm.params]
                call = lambda feed: vm["main"](tvm.runtime.tensor(feed[in_name]), *params).numpy()  # noqa: E731
                outs = [call(f) for f in evals]
                if config == "tvm-int8" and schedule == "default":
                    host_out0 = outs[0]
                x0 = [tvm.runtime.tensor(feed0[in_name]), *params]
                lat = _latency(lambda: vm["main"](*x0), args.budget, args.reps)
                acc = _accuracy(outs, ref["ort-fp32"], ref["ort-int8"] if config != "tvm-fp32" else None, labels, step)
                rows.append({"model": name, "config": config, "schedule": schedule, "latency": lat, "accuracy": acc, "build_s": round(build_s, 1)})
                if schedule == "metaschedule":
                    rows[-1]["kernels_us"] = _tuned_kernels(ms_dir)
        _add_ratios(rows)
        doc["rows"] += rows

        # arm64: compile only (no device here); does +dotprod give sdot?
        for config, (mod, rm) in variants.items():
            for mattr in (["+neon"], ["+neon", "+dotprod"]):
                target = tvm.target.Target(dict(ARM64.target_dict(), mattr=mattr))
                entry = {"model": name, "config": config, "mattr": ",".join(mattr)}
                try:
                    ex = tvm.compile(mod, target=target, relax_pipeline=relax.get_pipeline("default"))
                    entry.update(_asm_counts(ex))
                    if config == "tvm-int8":
                        # Link it and run it emulated: a core with dotprod must give the host's
                        # outputs; a Cortex-A53 (no dotprod) must fault on the sdot code.
                        so = work / (re.sub(r"\W+", "-", f"{name}-{entry['mattr']}") + ".so")
                        export_library(ex, so, ARM64)
                        entry["linked_elf"] = elf_arch(so)
                        for qemu_cpu in (["max", "cortex-a53"] if "+dotprod" in mattr else ["cortex-a53"]):
                            got = _emulate(so, feed0[in_name], rm.params, qemu_cpu, work)
                            if "output" in got and host_out0 is not None:
                                got = {"max_abs_diff_vs_host": float(np.abs(got["output"] - host_out0).max())}
                            entry.setdefault("emulated", {})[qemu_cpu] = got
                except Exception as err:
                    entry["error"] = str(err).strip().splitlines()[-1][:300]
                doc["arm64"].append(entry)


def _out_step(q_model) -> float:
    """Scale of the QDQ model's output quantization (one output step)."""
    from onnx import numpy_helper

    out = q_model.graph.output[0].name
    dq = next(n for n in q_model.graph.node if out in n.output)
    init = {i.name: i for i in q_model.graph.initializer}
    if dq.op_type != "DequantizeLinear" or dq.input[1] not in init:
        return float("nan")
    return float(numpy_helper.to_array(init[dq.input[1]]).reshape(-1)[0])


def _add_ratios(rows: list[dict]) -> None:
    """Speed vs ORT fp32 and vs TVM fp32 compiled the same way (>1: faster than the baseline)."""
    ort_fp32 = next(r for r in rows if r["config"] == "ort-fp32")["latency"]["median_ms"]
    for r in rows:
        if "latency" not in r:
            continue
        ms = r["latency"]["median_ms"]
        r["speed_vs_ort_fp32"] = ort_fp32 / ms
        same = next((x for x in rows if x["config"] == "tvm-fp32" and x["schedule"] == r["schedule"] and "latency" in x), None)
        if r["schedule"] != "ort" and same is not None:
            r["speed_vs_tvm_fp32_same_schedule"] = same["latency"]["median_ms"] / ms


# -------------------------------------------------------------------------------- reporting
def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        f"# int8 arithmetic vs fp32 — {doc['date']}",
        "",
        f"Machine: {m['cpu']} ({m['cores']} cores; ISA flags {', '.join(m['isa_flags']) or 'n/a'}), host `{m['host']}`. "
        f"TVM target `{doc['tvm_target']}`. One thread for TVM and ORT.",
        f"Command: `{doc['command']}`. Tools: " + ", ".join(f"{k} {v}" for k, v in sorted(doc["tools"].items())) + ".",
        "",
        "Latency: median of one call of `main` (one batch) after warm-up, ms (p10–p90). "
        "`×ORT fp32` and `×TVM fp32` are speed ratios against the fp32 baseline of the same run "
        "(ORT fp32; TVM fp32 compiled with the same schedule): > 1 is faster. Accuracy on held-out inputs vs ORT fp32 "
        "(digits: top-1 on its 360-image test split); `steps vs ORT int8`: largest output difference from ORT's int8 model, "
        "in output quantization steps.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in doc["rows"]):
        rows = [r for r in doc["rows"] if r["model"] == model]
        rw = doc.get("rewrite", {}).get(model, {})
        lines += [
            f"## {model}",
            "",
            f"Rewrite: {rw.get('rewritten', 0)} of {rw.get('matched', 0)} dequantize→matmul/conv2d sites to int8×int8→int32. "
            f"dlight CPU rules scheduled: " + "; ".join(f"{k} {v}" for k, v in doc.get("dlight_coverage", {}).get(model, {}).items()) + ".",
            "",
            "| config | schedule | median ms (p10–p90) | ×ORT fp32 | ×TVM fp32 | accuracy | steps vs ORT int8 | build s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['config']} | {r['schedule']} | failed: {r['error']} | | | | | |")
                continue
            lat, acc = r["latency"], r["accuracy"]
            quality = f"top-1 {acc['top1_accuracy']:.3f}" if "top1_accuracy" in acc else f"cos {acc['min_cosine_vs_fp32']:.4f}, argmax agree {acc['top1_agree_fp32']:.3f}"
            steps = f"{acc['max_steps_vs_ort_int8']:.0f}" if "max_steps_vs_ort_int8" in acc else "–"
            vs_tvm = f"{r['speed_vs_tvm_fp32_same_schedule']:.2f}" if "speed_vs_tvm_fp32_same_schedule" in r else "–"
            lines.append(
                f"| {r['config']} | {r['schedule']} | {lat['median_ms']:.3f} ({lat['p10_ms']:.3f}–{lat['p90_ms']:.3f}) | "
                f"{r['speed_vs_ort_fp32']:.2f} | {vs_tvm} | {quality} | {steps} | {r.get('build_s', '–')} |"
            )
        for r in rows:
            if r.get("kernels_us"):
                ks = sorted(r["kernels_us"].items(), key=lambda kv: -(kv[1] if kv[1] == kv[1] else 0))
                lines.append(
                    f"- {r['config']} tuned kernels (µs, MetaSchedule's measurement): "
                    + ", ".join(f"`{k}` {v:.1f}" for k, v in ks)
                )
        lines.append("")
    if doc["arm64"]:
        lines += [
            "## arm64 (aarch64-linux-gnu: compiled here, int8 libraries run emulated)",
            "",
            "Instruction counts in the generated assembly (default pipeline, untuned). The tvm-int8 libraries are linked "
            "with aarch64-linux-gnu-gcc and run on the emulated device (tools/setup_emu_arm64.sh) on eval input 0: "
            "`max` has dotprod, `cortex-a53` does not (an sdot there is an illegal instruction).",
            "",
            "| model | config | mattr | sdot | smlal/smull | fmla | kernels with sdot | linked | emulated run (qemu-aarch64 -cpu …) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for a in doc["arm64"]:
            if "error" in a:
                lines.append(f"| {a['model']} | {a['config']} | {a['mattr']} | failed: {a['error']} | | | | | |")
                continue
            emu = "; ".join(
                f"{cpu}: " + (f"max abs diff vs host {r['max_abs_diff_vs_host']:.3g}" if "max_abs_diff_vs_host" in r else r.get("error", "?"))
                for cpu, r in a.get("emulated", {}).items()
            )
            lines.append(
                f"| {a['model']} | {a['config']} | {a['mattr']} | {a['sdot']} | {a['smlal/smull']} | {a['fmla']} | "
                f"{', '.join(a['sdot_kernels']) or '–'} | {a.get('linked_elf', '')} | {emu} |"
            )
        lines.append("")
    if doc.get("notes"):
        lines += ["## Findings", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,digits", help="comma-separated substrings of model names")
    p.add_argument("--trials", type=int, default=16, help="MetaSchedule trials per kernel of the tuned MLP variants (0: no tuning)")
    p.add_argument("--reps", type=int, default=200, help="most timed runs per configuration")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timed runs per configuration (>= 10 runs)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--notes", help="a text file of findings (one per line) to add to the report")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--report-only", metavar="JSON", help="rewrite the Markdown of a results JSON, run nothing")
    again.add_argument("--coverage-only", metavar="JSON", help="recompute the dlight coverage of a results JSON "
                       "(rebuilds its modules, times nothing), then rewrite it and its Markdown")
    args = p.parse_args()
    # TVM's thread pool reads this when it starts: set it before anything imports tvm.
    os.environ["TVM_NUM_THREADS"] = "1"

    if args.report_only or args.coverage_only:
        json_path = Path(args.report_only or args.coverage_only)
        doc = json.loads(json_path.read_text())
        if args.coverage_only:
            recompute_coverage(doc)
    else:
        doc = run(args)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        json_path = out / f"int8-{doc['date']}.json"
    if args.notes:
        doc["notes"] = [line.strip() for line in Path(args.notes).read_text().splitlines() if line.strip()]
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    json_path.with_suffix(".md").write_text(markdown(doc))
    print(json_path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
