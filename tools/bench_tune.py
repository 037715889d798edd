"""What edgecomp's default CPU schedules and MetaSchedule tuning buy on the host CPU: ONNX Runtime
fp32 against TVM's plain pipeline, edgecomp untuned (default schedules) and edgecomp tuned, per
model, in one process and one run.

    python tools/bench_tune.py                     # digits-cnn, mobilenetv2, minilm (fetched into bench/cache)
    python tools/bench_tune.py --quick             # digits-cnn only
    python tools/bench_tune.py --trials mobilenetv2=192        # the budgets of bench/results/tune-2026-11-27
    python tools/bench_tune.py --quick --trials digits-cnn=8 --lowrank-trials 8 --out /tmp/bench-tune   # smoke test
    python tools/bench_tune.py --models minilm --trials minilm=64 --int8-trials 64   # MiniLM fp32 and int8 rows
    python tools/bench_tune.py --models minilm --lowrank-onnx minilm=bench/cache/distill-flops15/minilm-lowrank-distilled.onnx
    python tools/bench_tune.py --report-only bench/results/tune-<date>.json

Per model (batch 1, host target, inputs and reference from the model's eval split):

1. ``ort``: ONNX Runtime on the original model (CPUExecutionProvider, ``ORT_ENABLE_ALL``,
   ``intra_op_num_threads`` = the machine's physical cores, ``inter_op_num_threads`` = 1);
2. ``plain``: ``compile_relax(rm_plain, host, default_schedules=False)``: TVM's own CPU pipeline
   with no schedules on the import as it is (NCHW convs): what ``tvm.compile`` gives;
3. ``untuned``: ``compile_relax(rm, host)``, what ``edgecomp build`` compiles without ``--db``:
   the default schedules of ``targets/cpu_schedules.py`` (and fast math);
4. ``tuned``: ``tune(rm, host, db, trials)`` (``edgecomp.targets.tuning``'s builder and runner,
   recorded per row; the default schedules are measured first and recorded, so trials include
   one per task; a fresh database in a temporary folder, removed at the end unless
   ``--keep-db``), then ``compile_relax(rm, host, db=db)``.

``rm`` is the Relax module of the graph ``edgecomp build`` compiles: the front half of the build
(``edgecomp.api._front``: import, fixed shapes, the default cleanup passes, each checked against
ONNX Runtime) then ``to_relax`` with the host's layout (NHWC convs, HWIO weights stored so). For digits-cnn (and the models of ``--lowrank-models``) the same
rows are measured for the low-rank graph (``--lowrank``, default ``erank:1.0``: the graph ``edgecomp build --lowrank
erank:1.0`` compiles), tuned into its own database with ``--lowrank-trials``. ``--lowrank-onnx MODEL=PATH`` gives MODEL a
low-rank row that compiles a trained low-rank ONNX file instead (factorized and distilled by ``tools/train_distill.py``:
a factorization alone is too far from the original to deploy), its outputs checked against the original model. For minilm (and the models of
``--int8-models``) the same rows are measured for the int8 graph (``--int8``, default ``minmax``, calibrated on the
model's calib split) compiled with int8 arithmetic: what ``edgecomp build --int8 minmax --int8-arith`` compiles
(the ``plain`` column: TVM's pipeline on the QDQ graph as imported, dequantize → fp32).

Latency per call, one sample: TVM through ``relax.VirtualMachine(ex, tvm.cpu()).time_evaluator(
"main", tvm.cpu(), number=N, repeat=R)`` with the sample and the params as arguments (each
repeat is the mean of N calls); ONNX Runtime through the same scheme in Python: R blocks of N
``session.run`` calls on the same sample, each block timed with ``time.perf_counter``. N is chosen
per configuration so that a block lasts at least ``--block-ms``, and R (``--repeat``) is cut so
that the blocks take about 20 s (at least 10 blocks); median and p10–p90 over the R blocks.

Threads: both runtimes get the same count, the machine's physical cores (``edgecomp.threads.
physical_cores``): ONNX Runtime ``intra_op_num_threads``, TVM ``TVM_NUM_THREADS`` (set for every
child process; the count TVM's pool actually runs, ``tvm.runtime.num_threads()``, is recorded per
row). TVM's own default is half of the logical CPUs on x86 (it assumes hyper-threading): one thread
on this 2-vCPU VM, which made every TVM row before 2026-11-28 a one-core measurement against a
two-core ONNX Runtime. MetaSchedule tunes for the same count (``num-cores``).

Each model is measured in a process of its own, its rows' untuned columns before any of its tuning
runs, and each tuned build is timed in another fresh process (a tuning run leaves MetaSchedule's
worker process and thread pools behind: MobileNetV2's untuned latency measured after digits-cnn's
tuning in the same process read 9.8 ms, 6.4 ms in a fresh one; MiniLM's low-rank row, untuned after
the dense row's tuning, 14.4 ms, 10.8–11.8 in a fresh process: ``tune-2026-11-28-lowrank-a``). The
runs before that one measured each row's untuned column after the previous rows' tuning.

Numerics: the outputs of the untuned and the tuned code on ``--check-samples`` eval samples
against ONNX Runtime on the same graph (max abs error), so a wrong schedule cannot pass as
fast; for the low-rank rows also against the original model (the approximation error).

Failed candidates (MetaSchedule records them with a run time of 1e10 s) and the workloads left
without a valid record (they compile with the default schedule) are counted per row: MetaSchedule
times candidates on random inputs, and MiniLM's ``take`` kernels read out of bounds with random
int64 indices.

Writes bench/results/tune-<date>.md and .json, rewritten after every model (``"complete": false``
until the run ends); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODELS = ("digits-cnn", "mobilenetv2", "minilm")
DEFAULT_TRIALS = {"digits-cnn": 128, "mobilenetv2": 256, "minilm": 128}
LOWRANK_MODELS = ("digits-cnn",)
INT8_MODELS = ("minilm",)


def _log(msg: str) -> None:
    print(f"bench_tune: {msg}", file=sys.stderr, flush=True)


def _stats(per_call_s: list[float], number: int) -> dict[str, Any]:
    t = np.asarray(per_call_s, dtype=np.float64) * 1e3
    return {
        "median_ms": round(float(np.median(t)), 5),
        "p10_ms": round(float(np.percentile(t, 10)), 5),
        "p90_ms": round(float(np.percentile(t, 90)), 5),
        "number": int(number),
        "repeat": int(len(t)),
    }


def _plan(one_call_s: float, block_ms: float) -> int:
    """Calls per timed block, so that a block lasts at least ``block_ms``."""
    return max(1, math.ceil(block_ms / 1e3 / max(one_call_s, 1e-7)))


MAX_TIMING_S = 20.0  # a configuration's timed blocks take at most about this long (at least MIN_REPEAT blocks)
MIN_REPEAT = 10


def _repeats(one_call_s: float, number: int, repeat: int) -> int:
    return max(MIN_REPEAT, min(repeat, int(MAX_TIMING_S / max(one_call_s * number, 1e-9))))


def _time_ort(sess, feed: dict[str, np.ndarray], block_ms: float, repeat: int) -> dict[str, Any]:
    for _ in range(5):
        sess.run(None, feed)
    t0 = time.perf_counter()
    sess.run(None, feed)
    one = time.perf_counter() - t0
    number = _plan(one, block_ms)
    repeat = _repeats(one, number, repeat)
    blocks = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            sess.run(None, feed)
        blocks.append((time.perf_counter() - t0) / number)
    return _stats(blocks, number)


def _time_tvm(vm, args: list, block_ms: float, repeat: int) -> dict[str, Any]:
    import tvm

    dev = tvm.cpu()
    for _ in range(3):
        vm["main"](*args)
    t0 = time.perf_counter()
    vm["main"](*args)
    one = time.perf_counter() - t0
    number = _plan(one, block_ms)
    repeat = _repeats(one, number, repeat)
    res = vm.time_evaluator("main", dev, number=number, repeat=repeat)(*args)
    return _stats([float(x) for x in res.results], number)


def _ort_session(model, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _max_abs(got: list[list[np.ndarray]], want: list[list[np.ndarray]]) -> float:
    worst = 0.0
    for g_row, w_row in zip(got, want):
        for g, w in zip(g_row, w_row):
            worst = max(worst, float(np.max(np.abs(np.asarray(g, dtype=np.float64) - np.asarray(w, dtype=np.float64)))))
    return worst


def _min_cosine(got: list[list[np.ndarray]], want: list[list[np.ndarray]]) -> float:
    """The smallest cosine similarity between an output and its reference, over samples and outputs
    (the accuracy measure of an embedding model such as MiniLM, where max abs says little)."""
    worst = 1.0
    for g_row, w_row in zip(got, want):
        for g, w in zip(g_row, w_row):
            g, w = np.asarray(g, dtype=np.float64).ravel(), np.asarray(w, dtype=np.float64).ravel()
            worst = min(worst, float(g @ w / max(np.linalg.norm(g) * np.linalg.norm(w), 1e-30)))
    return worst


def _db_health(folder: Path, names: Callable[[], dict[str, str]]) -> dict[str, Any]:
    """Records in a tuning database, how many are failed candidates (run time 1e10 s, MetaSchedule's
    mark for a build or run error), and how many workloads have no valid record."""
    path = folder / "database_tuning_record.json"
    records = failed = 0
    valid: set[int] = set()
    seen: set[int] = set()
    if path.exists():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            records += 1
            workload, rec = json.loads(line)
            seen.add(int(workload))
            secs = [float(s) for s in (rec[1] or [])]
            if not secs or min(secs) >= 1e9:
                failed += 1
            else:
                valid.add(int(workload))
    return {"records": records, "failed_candidates": failed, "workloads": len(seen),
            "workloads_without_valid_record": len(seen - valid), "untuned_workloads": _name_workloads(folder, seen - valid, names)}


def _name_workloads(folder: Path, indices: set[int], names: Callable[[], dict[str, str]]) -> list[str]:
    """Task names of the database's workloads at ``indices`` (lines of its workload file)."""
    if not indices:
        return []
    try:
        lines = [ln for ln in (folder / "database_workload.json").read_text().splitlines() if ln.strip()]
        table = names()
        return [table.get(json.loads(lines[i])[0], f"workload {i}") for i in sorted(indices)]
    except Exception as err:  # noqa: BLE001  (names are a detail; the count is the result)
        return [f"? ({type(err).__name__}: {err})"[:120]]


def _task_names(rm, int8_arith: bool = False) -> dict[str, str]:
    """Structural hash → task name of the tuning tasks of ``rm`` (extracted as ``tune`` does), to
    name the workloads of a database (whose workload file keys them by that hash)."""
    import tvm
    import tvm_ffi
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from edgecomp.targets import get_target
    from edgecomp.targets.lowering import prepare_module
    from edgecomp.targets.tuning import _tuning_target

    host = get_target("host")
    target = tvm.target.Target(_tuning_target(host, False))
    with target:
        mod = tvm.transform.Sequential(
            [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(), relax.get_pipeline("zero")]
        )(prepare_module(rm, host, int8_arith))
    return {str(tvm_ffi.structural_hash(t.dispatched[0])): t.task_name for t in ms.relax_integration.extract_tasks(mod, target, {})}


class _Case:
    """One compiled graph (dense or low rank) of one model: its Relax module and its reference."""

    def __init__(self, label: str, graph, rm, rm_plain, in_specs, feeds: list[dict[str, np.ndarray]], threads: int,
                 int8_arith: bool = False) -> None:
        import tvm

        # rm: what `edgecomp build --target host` compiles (NHWC convs); rm_plain: the import as is
        self.label, self.graph, self.rm, self.rm_plain, self.in_specs, self.feeds = label, graph, rm, rm_plain, in_specs, feeds
        self.int8_arith = int8_arith
        self.sess = _ort_session(graph, threads)
        self.reference = [self.sess.run(None, f) for f in feeds]
        self.tparams = {id(m): [tvm.runtime.tensor(p) for p in m.params] for m in (rm, rm_plain)}

    def args(self, feed: dict[str, np.ndarray], rm) -> list:
        import tvm

        return [tvm.runtime.tensor(np.ascontiguousarray(feed[s.name])) for s in self.in_specs] + self.tparams[id(rm)]


def _measure_exe(case: _Case, ex, block_ms: float, repeat: int, plain: bool = False) -> tuple[dict[str, Any], list[list[np.ndarray]]]:
    import tvm
    from tvm import relax

    from edgecomp.bundle import _flatten

    rm = case.rm_plain if plain else case.rm
    vm = relax.VirtualMachine(ex, tvm.cpu())
    outputs = [[np.asarray(o) for o in _flatten(vm["main"](*case.args(f, rm)))] for f in case.feeds]
    latency = _time_tvm(vm, case.args(case.feeds[0], rm), block_ms, repeat)
    return latency, outputs


def _run_untuned(case: _Case, args, original_ref) -> dict[str, Any]:
    """The plain and untuned columns of a row (run for every row of a model before any tuning:
    see :func:`_measure`)."""
    from edgecomp.targets import get_target
    from edgecomp.targets.lowering import compile_relax

    host = get_target("host")
    row: dict[str, Any] = {"label": case.label}

    _log(f"[{case.label}] compiling with TVM's plain CPU pipeline (no schedules) ...")
    ex = compile_relax(case.rm_plain, host, default_schedules=False)
    lat, out = _measure_exe(case, ex, args.block_ms, args.repeat, plain=True)
    row["plain"] = {**lat, "max_abs_vs_ort": _max_abs(out, case.reference)}
    _log(f"[{case.label}] plain TVM: {lat['median_ms']:.4f} ms")
    del ex

    _log(f"[{case.label}] compiling untuned (default schedules) ...")
    t0 = time.perf_counter()
    ex = compile_relax(case.rm, host, int8_arith=case.int8_arith)
    row["untuned_compile_s"] = round(time.perf_counter() - t0, 2)
    lat, out = _measure_exe(case, ex, args.block_ms, args.repeat)
    row["untuned"] = {**lat, "max_abs_vs_ort": _max_abs(out, case.reference)}
    if original_ref is not None:
        row["untuned"]["max_abs_vs_original"] = _max_abs(out, original_ref)
        row["untuned"]["min_cosine_vs_original"] = _min_cosine(out, original_ref)
    _log(f"[{case.label}] untuned: {lat['median_ms']:.4f} ms (compile {row['untuned_compile_s']} s), "
         f"max abs {row['untuned']['max_abs_vs_ort']:.2e}")
    return row


def _run_tuning(case: _Case, row: dict[str, Any], trials: int, db_root: Path, args) -> None:
    """Tune ``case`` into its own database, then time the tuned build in a fresh process (into ``row``)."""
    from edgecomp.progress import Progress
    from edgecomp.targets import get_target
    from edgecomp.targets.tuning import tune

    host = get_target("host")
    db = db_root / case.label
    _log(f"[{case.label}] tuning: {trials} trials into {db} ...")
    # MetaSchedule's dictConfig leaves its logger at DEBUG after a tuning run, and its console handler
    # (stdout) takes that level on the next run in this process: reset it so the log stays in DB/logs.
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    report = tune(case.rm, host, db, trials, int8_arith=case.int8_arith, progress=Progress(enabled=True))
    wall = time.perf_counter() - t0
    row["tuning"] = {**report.to_json(), "wall_s": round(wall, 1),
                     **_db_health(Path(report.db), lambda: _task_names(case.rm, case.int8_arith))}
    _log(f"[{case.label}] tuned: {report.trials_run} trials over {report.tasks} task(s) in {wall:.0f} s "
         f"({row['tuning']['failed_candidates']} failed candidate(s), "
         f"{row['tuning']['workloads_without_valid_record']} workload(s) without a valid record)")
    row.update(_tuned_in_child(case.label, db, args))
    _log(f"[{case.label}] tuned: {row['tuned']['median_ms']:.4f} ms, max abs {row['tuned']['max_abs_vs_ort']:.2e}")


def _measure_tuned(case: _Case, db: Path, args, original_ref) -> dict[str, Any]:
    """The tuned build of ``case`` from database ``db``: compile, time, check (the second half of a
    row, run by :func:`_tuned_in_child` in a process that did not tune)."""
    from edgecomp.targets import get_target
    from edgecomp.targets.lowering import compile_relax

    t0 = time.perf_counter()
    ex = compile_relax(case.rm, get_target("host"), int8_arith=case.int8_arith, db=db)
    row: dict[str, Any] = {"tuned_compile_s": round(time.perf_counter() - t0, 2)}
    lat, out = _measure_exe(case, ex, args.block_ms, args.repeat)
    row["tuned"] = {**lat, "max_abs_vs_ort": _max_abs(out, case.reference)}
    if original_ref is not None:
        row["tuned"]["max_abs_vs_original"] = _max_abs(out, original_ref)
        row["tuned"]["min_cosine_vs_original"] = _min_cosine(out, original_ref)
    return row


def _in_fresh_process(argv: list[str], child_args: list[str], what: str) -> dict[str, Any]:
    """Run this script with ``argv + child_args + [JSON]`` in a fresh Python process and return
    the JSON it writes. Measured here: in one process, MobileNetV2's untuned latency after
    digits-cnn's tuning run read 9.8 ms, in a fresh process 6.4 ms (a tuning run leaves
    MetaSchedule's worker process and thread pools behind), so every model, and every tuned
    build, is timed in a process of its own."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="edgecomp-bench-tune-") as tmp:
        dest = Path(tmp) / "out.json"
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, *child_args, str(dest)])
        if proc.returncode != 0 or not dest.exists():
            raise RuntimeError(f"the process {what} exited with status {proc.returncode}")
        return json.loads(dest.read_text())


def _tuned_in_child(label: str, db: Path, args) -> dict[str, Any]:
    """``_measure_tuned`` for row ``label`` in a fresh process (not the one that tuned)."""
    return _in_fresh_process(args.argv, ["--tuned-child", label, str(db)], f"timing the tuned build of {label}")


def _measure_in_child(name: str, db_root: Path, argv: list[str]) -> dict[str, Any]:
    """``_measure(name)`` in a fresh process (with its own warm-up)."""
    return _in_fresh_process(argv, ["--db", str(db_root), "--child", name], f"measuring {name}")


def _front(assets, shapes: dict[str, tuple[int, ...]], lowrank: str | None, int8: str | None = None,
           source: Path | None = None):
    """The graph ``edgecomp build`` compiles (and its input specs, pass records); ``source``: an ONNX
    file compiled instead of the model's own (a trained low-rank model of ``--lowrank-onnx``)."""
    from edgecomp.api import _front as build_front
    from edgecomp.numerics import Tolerance
    from edgecomp.progress import Progress

    fr = build_front(source or assets.onnx, None, shapes, assets.eval, 8, assets.calib, lowrank, int8, None, None, None,
                     int8 is not None, Tolerance(), None, Progress(enabled=False))
    return fr


def _case(label: str, assets, shapes, lowrank: str | None, feeds, threads: int, int8: str | None = None,
          source: Path | None = None):
    """The ``_Case`` of one row (the graph ``edgecomp build`` compiles) and its front-half result;
    ``int8``: the int8 pass's method, compiled with int8 arithmetic; ``source``: see :func:`_front`."""
    from edgecomp.targets import get_target
    from edgecomp.targets.lowering import to_relax, wants_channels_last

    fr = _front(assets, shapes, lowrank, int8, source)
    specs = ({s.name: s.shape for s in fr.in_specs}, {s.name: s.dtype for s in fr.in_specs})
    rm = to_relax(fr.final, *specs, channels_last_convs=wants_channels_last(get_target("host")), int8_arith=int8 is not None)
    return _Case(label, fr.final, rm, to_relax(fr.final, *specs), fr.in_specs, feeds, threads, int8 is not None), fr


def _lowrank_onnx(args) -> dict[str, Path]:
    """``--lowrank-onnx MODEL=PATH,...``: models whose low-rank row compiles a trained low-rank ONNX
    file (e.g. factorized then distilled by ``tools/train_distill.py``) instead of ``--lowrank``'s pass.
    Parsed once by ``main`` into ``args.lowrank_sources``."""
    out = {}
    for item in (args.lowrank_onnx or "").split(","):
        if item.strip():
            name, sep, path = item.partition("=")
            if not sep or not Path(path).is_file():
                raise SystemExit(f"--lowrank-onnx {item!r}: expected MODEL=PATH of an existing ONNX file")
            out[name.strip()] = Path(path).resolve()
    return out


def _variant_of(label: str, args) -> tuple[str, str | None, str | None]:
    """(model name, low-rank policy, int8 method) of a row label (``NAME``, ``NAME-lowrank``, ``NAME-int8``).
    A model of ``--lowrank-onnx`` has no policy: its low-rank row's graph comes factorized (:func:`_source_of`)."""
    if label.endswith("-lowrank"):
        name = label.removesuffix("-lowrank")
        return name, (None if name in args.lowrank_sources else args.lowrank), None
    if label.endswith("-int8"):
        return label.removesuffix("-int8"), None, args.int8
    return label, None, None


def _source_of(label: str, args) -> Path | None:
    """The ONNX file a row compiles instead of its model's own (``--lowrank-onnx``), or None."""
    return args.lowrank_sources.get(label.removesuffix("-lowrank")) if label.endswith("-lowrank") else None


def _model_inputs(name: str, args):
    from edgecomp.bench.models import fetch

    assets = fetch(name, quiet=True)
    shapes = {i["name"]: tuple(i["shape"]) for i in assets.meta["inputs"]}
    arrays = assets.arrays("eval")
    count = min(args.check_samples, len(arrays[next(iter(shapes))]))
    return assets, shapes, [{k: arrays[k][i] for k in shapes} for i in range(count)]


def _measure(name: str, trials: int, lowrank_trials: int, int8_trials: int, db_root: Path, args) -> dict[str, Any]:
    import tvm

    threads = int(os.environ["TVM_NUM_THREADS"])  # set by main() for ORT and TVM alike
    assets, shapes, feeds = _model_inputs(name, args)
    count = len(feeds)

    result: dict[str, Any] = {"model": name, "inputs": {k: list(v) for k, v in shapes.items()}, "check_samples": count}
    sess = _ort_session(assets.onnx, threads)
    original_ref = [sess.run(None, f) for f in feeds]
    result["ort"] = {**_time_ort(sess, feeds[0], args.block_ms, args.repeat), "threads": threads,
                     "graph_optimization_level": "ORT_ENABLE_ALL"}
    result["tvm_threads"] = int(tvm.runtime.num_threads())
    _log(f"[{name}] ORT fp32: {result['ort']['median_ms']:.4f} ms")
    del sess

    rows = []
    variants = [(name, trials)]
    if (name in args.lowrank_sources or name in args.lowrank_models.split(",") and args.lowrank) and lowrank_trials > 0:
        variants.append((f"{name}-lowrank", lowrank_trials))
    if name in args.int8_models.split(",") and args.int8 and int8_trials > 0:
        variants.append((f"{name}-int8", int8_trials))
    # Every row's plain and untuned columns first, then the tuning runs: a tuning run leaves
    # MetaSchedule's worker process and thread pools behind, which slowed an untuned row measured
    # after it in the same process (MiniLM low rank: 14.4 ms after the dense row's tuning, 10.8–11.8 in
    # a fresh process; see the module docstring).
    cases: list[_Case | None] = []
    for label, _n in variants:
        _, lowrank, int8 = _variant_of(label, args)
        source = _source_of(label, args)
        lossy = bool(lowrank or int8 or source)
        case = None
        try:
            case, fr = _case(label, assets, shapes, lowrank, feeds, threads, int8, source)
            row = _run_untuned(case, args, original_ref if lossy else None)
            row["lowrank"], row["int8"] = lowrank, int8
            if source is not None:
                row["lowrank_onnx"] = _describe_source(source)
            row["params"] = int(sum(p.size for p in case.rm.params))
            if lossy:
                row["ort_same_graph"] = _time_ort(case.sess, feeds[0], args.block_ms, args.repeat)
                row["passes"] = [{"name": r.name, "params": list(r.params), "stats": r.stats} for r in fr.records if r.lossy]
        except Exception as err:  # noqa: BLE001  (a failed variant is a row, not the end of the run)
            import traceback

            traceback.print_exc()
            row, case = {"label": label, "lowrank": lowrank, "int8": int8, "error": f"{type(err).__name__}: {err}"[:300]}, None
        rows.append(row)
        cases.append(case)
    for i, ((label, n), case) in enumerate(zip(variants, cases)):
        if case is None:
            continue
        try:
            _run_tuning(case, rows[i], n, db_root, args)
        except Exception as err:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            rows[i] = {"label": label, "lowrank": rows[i]["lowrank"], "int8": rows[i]["int8"],
                       "error": f"{type(err).__name__}: {err}"[:300]}
    result["rows"] = rows
    return result


def _describe_source(path: Path) -> dict[str, Any]:
    """What a ``--lowrank-onnx`` file is: its path, hash and weights (constant MatMul/Gemm operands),
    and the policy of the stamp ``tools/train_distill.py`` leaves beside the factorized model it
    distilled (``minilm-lowrank-distilled.onnx`` → ``minilm-lowrank.json``)."""
    import hashlib

    import onnx
    from train_distill import layer_params  # tools/ (this script's folder) is on sys.path

    weights = layer_params(onnx.load(str(path)))
    info: dict[str, Any] = {"path": str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path),
                            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                            "matmul_params": weights["matmul"], "params": weights["all"]}
    stamp = path.with_name(path.stem.removesuffix("-distilled") + ".json")
    if stamp.is_file():
        info["factorized_with"] = json.loads(stamp.read_text()).get("stamp")
    return info


def _row_title(model: str, row: dict[str, Any]) -> str:
    if row.get("lowrank_onnx"):
        src = row["lowrank_onnx"]
        how = (src.get("factorized_with") or {}).get("policy")
        return f"{model} low rank (trained: `{src['path']}`{', ' + how if how else ''})"
    if row.get("lowrank"):
        return f"{model} low rank ({row['lowrank']})"
    if row.get("int8"):
        return f"{model} int8 ({row['int8']}, int8 arithmetic)"
    return row["label"]


def _fmt(lat: dict[str, Any]) -> str:
    return f"{lat['median_ms']:.3f} ({lat['p10_ms']:.3f}–{lat['p90_ms']:.3f})"


def _runners(doc: dict[str, Any]) -> str:
    names = sorted({row["tuning"]["runner"] for r in doc["results"] for row in r.get("rows", []) if "tuning" in row})
    return " / ".join(names) or "?"


def _report(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        f"# MetaSchedule tuning vs ONNX Runtime, {doc['date']}", "",
        f"Machine: {m['cpu']}, {m['cores']} cores; host target. Command: `{doc['command']}`; "
        f"wall time {doc['wall_s']:.0f} s, of which {doc.get('warm_up_s')} s warm-up (each model is measured in a fresh "
        "process, which first runs one compile and a 1-trial tuning run of digits-cnn into a throwaway database: the "
        "process's one-time TVM/MetaSchedule start-up, not charged to any row).",
        f"Threads: ONNX Runtime `intra_op_num_threads={doc['ort_threads']}` (`ORT_ENABLE_ALL`, CPUExecutionProvider); "
        + (f"TVM `TVM_NUM_THREADS={doc['tvm_threads']}` (pool sizes measured per model: "
           f"{', '.join(str(r.get('tvm_threads', '?')) for r in doc['results'])}), the `num-cores` MetaSchedule tunes for."
           if isinstance(doc.get("tvm_threads"), int) else  # runs before 2026-11-28 (TVM's x86 default: half the CPUs)
           f"TVM its default thread pool (recorded as \"{doc.get('tvm_threads')}\"; one thread on a 2-vCPU x86 VM)."),
        "Latency per call, batch 1, one eval sample: median (p10–p90) over `repeat` blocks of `number` calls "
        "(TVM: `VirtualMachine.time_evaluator(\"main\")`; ORT: `session.run` in a `perf_counter`-timed loop, same scheme). "
        f"Tuning: `edgecomp.targets.tuning.tune`, candidates {_runners(doc)}; a fresh database per row; trials = run / budget. "
        f"max abs err: the tuned code's outputs vs ONNX Runtime on the same graph, {doc['check_samples']} eval samples.",
    ]
    if doc.get("int_args"):
        lines.append(f"Integer arguments of measured candidates: {doc['int_args']}.")
    if not doc.get("complete", True):
        lines += ["", "**Incomplete: the run stopped (or is still running) after the models below.**"]
    if doc.get("note"):
        lines += ["", f"Note: {doc['note']}"]
    lines += [
        "",
        "| model | ORT fp32 ms | TVM plain ms | edgecomp untuned ms | edgecomp tuned ms (trials, tuning s) | untuned/ORT | tuned/ORT | plain/untuned | max abs err untuned, tuned |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        if "error" in r:
            lines.append(f"| {r['model']} | FAILED: {r['error']} | | | | | |")
            continue
        ort = r["ort"]
        for row in r["rows"]:
            label = _row_title(r["model"], row)
            if "error" in row:
                lines.append(f"| {label} | {_fmt(ort)} | FAILED: {row['error']} | | | | |")
                continue
            u, t, tu, pl = row["untuned"], row["tuned"], row["tuning"], row.get("plain")
            lines.append(
                f"| {label} | {_fmt(ort)} | {_fmt(pl) if pl else '–'} | {_fmt(u)} | {_fmt(t)} ({tu['trials_run']}/{tu['trials_requested']}, "
                f"{tu['wall_s']:.0f} s) | {u['median_ms'] / ort['median_ms']:.2f} | {t['median_ms'] / ort['median_ms']:.2f} | "
                f"{pl['median_ms'] / u['median_ms']:.1f} | {u['max_abs_vs_ort']:.1e}, {t['max_abs_vs_ort']:.1e} |"
                if pl else
                f"| {label} | {_fmt(ort)} | – | {_fmt(u)} | {_fmt(t)} ({tu['trials_run']}/{tu['trials_requested']}, "
                f"{tu['wall_s']:.0f} s) | {u['median_ms'] / ort['median_ms']:.2f} | {t['median_ms'] / ort['median_ms']:.2f} | – | "
                f"{u['max_abs_vs_ort']:.1e}, {t['max_abs_vs_ort']:.1e} |"
            )
    lines += ["", "Details:", ""]
    for r in doc["results"]:
        if "error" in r:
            continue
        for row in r["rows"]:
            if "error" in row:
                continue
            tu = row["tuning"]
            extra = ""
            if row.get("lowrank") or row.get("int8") or row.get("lowrank_onnx"):
                graph = "QDQ int8 (its own int8 kernels)" if row.get("int8") else "low-rank"
                extra = (f"; ORT on the {graph} graph {_fmt(row['ort_same_graph'])} ms; max abs vs the original model: "
                         f"untuned {row['untuned']['max_abs_vs_original']:.2e}, tuned {row['tuned']['max_abs_vs_original']:.2e}")
                if "min_cosine_vs_original" in row["tuned"]:
                    extra += (f"; min cosine vs the original model: untuned {row['untuned']['min_cosine_vs_original']:.4f}, "
                              f"tuned {row['tuned']['min_cosine_vs_original']:.4f}")
                if row.get("lowrank_onnx"):
                    src = row["lowrank_onnx"]
                    extra += (f"; compiles `{src['path']}` (sha256 {src['sha256'][:12]}…, MatMul/Gemm weights "
                              f"{src['matmul_params']:,}, all initializers {src['params']:,})")
            lines.append(
                f"- {row['label']}: {row['params']:,} params; {tu['tasks']} task(s) ({tu['workloads']} with records), {tu['trials_run']} trials "
                f"(budget {tu['trials_requested']}) in {tu['wall_s']:.0f} s, {tu['failed_candidates']} failed candidate(s), "
                f"{tu['workloads_without_valid_record']} workload(s) without a valid record"
                + (f" ({', '.join(tu['untuned_workloads'])})" if tu.get("untuned_workloads") else "")
                + "; compile untuned "
                f"{row['untuned_compile_s']} s, tuned {row['tuned_compile_s']} s; untuned max abs {row['untuned']['max_abs_vs_ort']:.1e}"
                f"; timing number×repeat ORT {r['ort']['number']}×{r['ort']['repeat']}, untuned "
                f"{row['untuned']['number']}×{row['untuned']['repeat']}, tuned {row['tuned']['number']}×{row['tuned']['repeat']}{extra}"
            )
    dense = {r["model"]: next((x for x in r["rows"] if not x.get("lowrank") and not x.get("lowrank_onnx") and not x.get("int8")
                               and "error" not in x), None)
             for r in doc["results"] if "error" not in r}
    for r in doc["results"]:
        if "error" in r:
            continue
        for row in r["rows"]:
            d = dense.get(r["model"])
            if (row.get("lowrank") or row.get("lowrank_onnx") or row.get("int8")) and "error" not in row and d is not None:
                lines.append(
                    f"- {r['model']}: {'int8' if row.get('int8') else 'low rank'} vs dense fp32, untuned {row['untuned']['median_ms']:.3f} vs "
                    f"{d['untuned']['median_ms']:.3f} ms ({row['untuned']['median_ms'] / d['untuned']['median_ms']:.2f}×), "
                    f"tuned {row['tuned']['median_ms']:.3f} vs {d['tuned']['median_ms']:.3f} ms "
                    f"({row['tuned']['median_ms'] / d['tuned']['median_ms']:.2f}×)"
                )
    return "\n".join(lines) + "\n"


def _warm_up(db: Path) -> float:
    """One compile and a 1-trial tuning run of digits-cnn into a throwaway database: the process's
    one-time costs (TVM and MetaSchedule start-up, xgboost, tensor intrinsics) are charged here,
    not to the first model's compile or tuning time."""
    from edgecomp.bench.models import fetch
    from edgecomp.targets import get_target
    from edgecomp.targets.lowering import compile_relax, to_relax
    from edgecomp.targets.tuning import tune

    t0 = time.perf_counter()
    assets = fetch("digits-cnn", quiet=True)
    shapes = {i["name"]: tuple(i["shape"]) for i in assets.meta["inputs"]}
    fr = _front(assets, shapes, None)
    rm = to_relax(fr.final, {s.name: s.shape for s in fr.in_specs}, {s.name: s.dtype for s in fr.in_specs},
                  channels_last_convs=True)
    compile_relax(rm, get_target("host"))
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    tune(rm, get_target("host"), db, 1)
    return time.perf_counter() - t0


def _parse_trials(text: str | None) -> dict[str, int]:
    out = dict(DEFAULT_TRIALS)
    for item in (text or "").split(","):
        if item.strip():
            k, _, v = item.partition("=")
            out[k.strip()] = int(v)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="digits-cnn only")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--trials", default=None, metavar="MODEL=N,...",
                    help="trial budget per model (default " + ",".join(f"{k}={v}" for k, v in DEFAULT_TRIALS.items()) + ")")
    ap.add_argument("--lowrank", default="erank:1.0", help="low-rank policy of the extra low-rank rows ('' = none)")
    ap.add_argument("--lowrank-models", default=",".join(LOWRANK_MODELS), help="models that get a low-rank row (default digits-cnn)")
    ap.add_argument("--lowrank-onnx", default=None, metavar="MODEL=PATH,...",
                    help="models whose low-rank row compiles this trained low-rank ONNX file (e.g. tools/train_distill.py's) "
                         "instead of applying --lowrank; outputs checked against the model's original")
    ap.add_argument("--lowrank-trials", type=int, default=None, help="trial budget of the low-rank graph (default: the model's)")
    ap.add_argument("--int8", default="minmax", help="int8 method of the extra int8 rows, compiled with int8 arithmetic ('' = none)")
    ap.add_argument("--int8-models", default=",".join(INT8_MODELS), help="models that get an int8 row (default minilm)")
    ap.add_argument("--int8-trials", type=int, default=None, help="trial budget of the int8 graph (default: the model's)")
    ap.add_argument("--repeat", type=int, default=30, help="timed blocks per configuration (default 30)")
    ap.add_argument("--block-ms", type=float, default=50.0, help="minimum length of a timed block (default 50 ms)")
    ap.add_argument("--check-samples", type=int, default=8, help="eval samples the numerics are checked on (default 8)")
    ap.add_argument("--db", default=None, help="root of the tuning databases (default: a temporary folder)")
    ap.add_argument("--keep-db", action="store_true", help="keep the temporary databases")
    ap.add_argument("--note", default=None, help="a line for the report (e.g. conditions of the run)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--report-only", metavar="JSON")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "JSON"), help=argparse.SUPPRESS)
    ap.add_argument("--tuned-child", nargs=3, metavar=("LABEL", "DB", "JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    args.lowrank_sources = _lowrank_onnx(args)  # a bad one is a one-line error here, not a failed row in a child
    from edgecomp.threads import physical_cores

    threads = physical_cores()
    os.environ["TVM_NUM_THREADS"] = str(threads)  # TVM's own default would be half the cores on x86
    from edgecomp.bench.report import write_atomic
    from edgecomp.bench.runner import _machine

    if args.report_only:
        doc = json.loads(Path(args.report_only).read_text())
        write_atomic(Path(args.report_only).with_suffix(".md"), _report(doc))
        return 0
    models = ["digits-cnn"] if args.quick else [m.strip() for m in args.models.split(",") if m.strip()]
    trials = _parse_trials(args.trials)
    if args.tuned_child:  # one row's tuned build, timed in this fresh process (see _tuned_in_child)
        label, db, dest = args.tuned_child
        name, lowrank, int8 = _variant_of(label, args)
        source = _source_of(label, args)
        assets, shapes, feeds = _model_inputs(name, args)
        case, _ = _case(label, assets, shapes, lowrank, feeds, threads, int8, source)
        original_ref = None
        if lowrank or int8 or source:
            sess = _ort_session(assets.onnx, threads)
            original_ref = [sess.run(None, f) for f in feeds]
        Path(dest).write_text(json.dumps(_measure_tuned(case, Path(db), args, original_ref)))
        return 0
    if args.child:  # one model in this fresh process (see _measure_in_child)
        name, dest = args.child
        n = trials.get(name, 64)
        db_root = Path(args.db)
        warm_up = _warm_up(db_root / f"warm-up-{name}")
        _log(f"warm-up (TVM compile and MetaSchedule's first tuning run in this process): {warm_up:.0f} s")
        row = _measure(name, n, args.lowrank_trials if args.lowrank_trials is not None else n,
                       args.int8_trials if args.int8_trials is not None else n, db_root, args)
        row["warm_up_s"] = round(warm_up, 1)
        Path(dest).write_text(json.dumps(row))
        return 0
    t_start = time.perf_counter()
    own_db = args.db is None
    db_root = Path(tempfile.mkdtemp(prefix="edgecomp-bench-tune-db-")) if own_db else Path(args.db)
    _log(f"models {', '.join(models)}; trials {', '.join(f'{m}={trials.get(m, 64)}' for m in models)}; databases in {db_root}")
    results: list[dict[str, Any]] = []
    warm_up = None
    date = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def document(complete: bool) -> dict[str, Any]:
        return {
            "date": date,
            "command": "python tools/bench_tune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": _machine(),
            "complete": complete,
            "wall_s": round(time.perf_counter() - t_start, 1),
            "ort_threads": threads,
            "tvm_threads": threads,
            "check_samples": args.check_samples,
            "warm_up_s": None if warm_up is None else round(warm_up, 1),
            "trials": {m: trials.get(m, 64) for m in models},
            "lowrank_trials": args.lowrank_trials,
            "lowrank_onnx": args.lowrank_onnx,
            "int8": args.int8,
            "int8_trials": args.int8_trials,
            "note": args.note,
            "results": results,
        }

    def write(complete: bool) -> dict[str, Any]:
        doc = document(complete)  # after every model: a crash (a segfaulting candidate) keeps the rows done
        write_atomic(out / f"tune-{date}.json", json.dumps(doc, indent=2) + "\n")
        write_atomic(out / f"tune-{date}.md", _report(doc))
        return doc

    try:
        warm_up = 0.0
        for name in models:
            _log(f"{name} ...")
            t0 = time.perf_counter()
            try:
                row = _measure_in_child(name, db_root, argv if argv is not None else sys.argv[1:])
                warm_up += row.pop("warm_up_s", 0.0)
                results.append(row)
            except Exception as err:  # noqa: BLE001
                results.append({"model": name, "error": f"{type(err).__name__}: {err}"[:300]})
            _log(f"{name} done ({time.perf_counter() - t0:.0f} s; run so far {time.perf_counter() - t_start:.0f} s)")
            write(complete=False)
    finally:
        if own_db and not args.keep_db:
            shutil.rmtree(db_root, ignore_errors=True)
    doc = write(complete=True)
    print(_report(doc))
    ok = all("error" not in r and all("error" not in x for x in r["rows"]) for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
