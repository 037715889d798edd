"""MetaSchedule auto-tuning with a database that later builds reuse.

``edgecomp tune MODEL --target T --trials N --db DIR`` tunes the model's TIR kernels and keeps
every measured record in ``DIR/<target>/`` (MetaSchedule's JSON database: one line per record,
written as each batch is measured, so an interrupted run loses at most the batch in flight and a
rerun continues from the records already there). ``edgecomp build ... --db DIR`` compiles through
the same database without tuning.

Facts this module is built on (measured here, see DESIGN.md):

- Tasks are extracted from the module after ``DecomposeOpsForInference`` + the ``zero`` pipeline;
  a freshly imported module has no TIR to tune.
- A database is applied to the *raw* imported module by
  ``relax.get_pipeline("static_shape_tuning", total_trials=0, work_dir=DB)``; a module that was
  already legalized and fused silently gets untuned code.
- MetaSchedule's ``LocalBuilder`` starts new worker processes for every batch, and each imports
  TVM and its tensor intrinsics (1–2.5 min a batch on 2 cores). Candidates are built in this
  process instead (``InProcessBuilder``: the same ``default_build``, no start-up; building runs
  no generated code). They are *timed* in MetaSchedule's ``LocalRunner``, whose worker process is
  started once and reused: timing runs generated code on random inputs, which can crash (a MiniLM
  ``take`` kernel given out-of-range random indices segfaulted when timed in-process), and a crash
  must cost a worker restart, not the tuning run. Devices behind a TVM RPC tracker are timed with
  MetaSchedule's ``RPCRunner``.
- Records are only valid for the target they were measured on: each target gets its own folder
  with a ``target.json``; a database recorded for another target (or another CPU) is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import signal
import threading
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from edgecomp.errors import DeviceError, InputError, UnsupportedModelError
from edgecomp.targets.base import Target

__all__ = ["TuneReport", "tune", "check_can_tune", "apply_database", "database_dir", "check_tracker", "record_count", "evaluator_config"]

log = logging.getLogger(__name__)

TARGET_FILE = "target.json"


@dataclasses.dataclass
class TuneReport:
    """What a tuning run did."""

    db: str
    target: str
    tasks: int
    trials_requested: int
    trials_before: int
    trials_run: int
    seconds: float
    runner: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------
# the database folder


def database_dir(db: str | os.PathLike, target: Target, *, create: bool, remote: bool = False) -> Path:
    """``DB/<target name>``, checked against ``target`` (its ``target.json``).

    ``create=False`` (a build reusing tuning) requires the folder to exist.
    """
    root = Path(db)
    if root.exists() and not root.is_dir():
        raise InputError(f"tuning database {root} is not a folder")
    if (root / TARGET_FILE).exists():  # a target folder given instead of the root
        raise InputError(f"{root} is one target's folder of a tuning database; give its parent folder ({root.parent})")
    folder = root / target.name
    want = {"target": target.name, "tvm_target": target.target_dict()}
    if not folder.exists():
        if not create:
            have = sorted(p.name for p in root.glob("*") if (p / TARGET_FILE).exists()) if root.is_dir() else []
            has = f" (it has records for: {', '.join(have)})" if have else ""
            raise InputError(f"tuning database {root} has no records for target {target.name}{has}: run edgecomp tune first")
        folder.mkdir(parents=True)
        record = {**want, "tuning_target": _tuning_target(target, remote)}
        (folder / TARGET_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        return folder
    try:
        have = json.loads((folder / TARGET_FILE).read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"tuning database {folder}: cannot read {TARGET_FILE}: {err}") from None
    if {k: have.get(k) for k in want} != json.loads(json.dumps(want)):
        raise InputError(
            f"tuning database {folder} was recorded for {have.get('tvm_target')}, not for target {target.name} "
            f"{target.target_dict()}: its timings do not apply here; use another --db"
        )
    return folder


def _tuning_target(target: Target, remote: bool) -> dict[str, Any]:
    """The target dict MetaSchedule tunes for: it needs ``num-cores`` (when timed here, the threads
    TVM's pool runs, ``edgecomp.threads``; 4, a typical phone/board SoC cluster, for remote devices
    unless the target dict says)."""
    from edgecomp.threads import default_tvm_threads

    spec = target.target_dict()
    if spec.get("kind") == "llvm" and "num-cores" not in spec:
        spec["num-cores"] = 4 if remote else default_tvm_threads()
    return spec


def _stored_target(folder: Path):
    import tvm

    return tvm.target.Target(json.loads((folder / TARGET_FILE).read_text())["tuning_target"])


def record_count(folder: Path) -> int:
    """Tuning records in a target folder (one JSON line each)."""
    path = folder / "database_tuning_record.json"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


def _open(folder: Path):
    from tvm.s_tir import meta_schedule as ms

    return ms.database.JSONDatabase(
        path_workload=str(folder / "database_workload.json"),
        path_tuning_record=str(folder / "database_tuning_record.json"),
        allow_missing=True,
    )


# ------------------------------------------------------------------------------------------------
# in-process measurement


def _in_process_classes():
    """InProcessBuilder and the progress callback, defined lazily (they subclass TVM classes)."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build
    from tvm.ir.utils import derived_object

    @derived_object
    class InProcessBuilder(ms.builder.PyBuilder):
        def __init__(self, work: Path, stop: threading.Event) -> None:
            super().__init__()
            self.work, self.stop = work, stop

        def build(self, build_inputs):
            if self.stop.is_set():  # Ctrl-C: do not start another batch
                raise _Interrupted("tuning interrupted")
            results = []
            for inp in build_inputs:
                try:
                    with warnings.catch_warnings():  # default_build calls the deprecated tvm.build
                        warnings.simplefilter("ignore", DeprecationWarning)
                        lib = default_build(inp.mod, inp.target, None)
                    # one folder per candidate: MetaSchedule's default callback removes it after timing
                    path = Path(tempfile.mkdtemp(dir=self.work)) / "candidate.so"
                    lib.export_library(str(path))
                    results.append(ms.builder.BuilderResult(str(path), None))
                except Exception as err:  # noqa: BLE001  (a failed candidate is a result, not the end)
                    results.append(ms.builder.BuilderResult(None, f"{type(err).__name__}: {str(err)[-300:]}"))
            return results

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self, total: int, before: int, progress, stop: threading.Event) -> None:
            super().__init__()
            self.total, self.done, self.before, self.progress, self.stop = total, 0, before, progress, stop
            self.t0 = time.monotonic()
            self.best: dict[int, float] = {}

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            # runs after MetaSchedule's own callbacks: this batch is in the database already
            if self.stop.is_set():
                raise _Interrupted("tuning interrupted")
            self.done += len(measure_candidates)
            for r in runner_results:
                if r.run_secs:
                    t = sum(float(s) for s in r.run_secs) / len(r.run_secs)
                    self.best[task_id] = min(self.best.get(task_id, float("inf")), t)
            elapsed = time.monotonic() - self.t0
            eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
            best = sum(self.best.values()) * 1e6
            self.progress.update(
                f"tuning: {self.before + self.done}/{self.before + self.total} trials, "
                f"best kernels so far {best:.1f} us over {len(self.best)} task(s), ETA {eta:.0f} s"
            )

    return InProcessBuilder, Progress


# ------------------------------------------------------------------------------------------------


def check_tracker(host: str, port: int, key: str, timeout: float = 10.0) -> None:
    """A one-line error within ``timeout`` if the tracker is unreachable or has no device under ``key``."""
    from edgecomp.targets.devices import check_tracker_key

    check_tracker_key(host, port, key, timeout, f"tracker {host}:{port}")


class _Interrupted(Exception):
    """Raised from the progress callback to end a tuning run after the batch in flight."""


@contextlib.contextmanager
def _sigint_stops(stop: threading.Event, progress):
    """Ctrl-C ends tuning at the next step: before another batch is built, or after the batch being
    measured is saved (a second Ctrl-C aborts at once). Ctrl-C inside TVM's C++ loop would otherwise surface as an anonymous
    error from whatever callback it hit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stop.is_set():
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        stop.set()
        progress.note("interrupted: stopping at the end of this step (the records measured so far are kept); Ctrl-C again aborts now")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def check_can_tune(target: Target, trials: int, tracker: tuple[str, int] | None, rpc_key: str | None) -> None:
    """Everything about a tuning request that can fail before any work, as one-line errors."""
    if trials < 1:
        raise InputError("--trials must be at least 1")
    missing = [m for m in ("xgboost", "cloudpickle") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"tuning needs MetaSchedule's dependencies ({', '.join(missing)} missing): pip install 'edgecomp[tune]'")
    if tracker is None and not target.runs_on_this_machine:
        raise InputError(
            f"target {target.name} ({target.arch}, {target.device}) cannot be timed on this machine: tune on devices "
            f"behind a TVM RPC tracker (--tracker HOST:PORT --rpc-key KEY)"
        )
    if tracker is not None:
        if not rpc_key:
            raise InputError("--tracker needs --rpc-key (the key the devices registered under)")
        check_tracker(tracker[0], tracker[1], rpc_key)


def tune(
    relax_model: Any,
    target: Target,
    db: str | os.PathLike,
    trials: int,
    *,
    int8_arith: bool = False,
    trials_per_task: int | None = None,
    tracker: tuple[str, int] | None = None,
    rpc_key: str | None = None,
    progress: Any = None,
    seed: int = 0,
) -> TuneReport:
    """Tune ``relax_model`` for ``target`` until ``DB/<target>`` holds ``trials`` records.

    Local measurement (in-process) for targets that run on this machine; with ``tracker`` and
    ``rpc_key``, candidates are cross-built here and timed on the devices registered under the key.
    The module tuned is the one ``compile_relax(relax_model, target, int8_arith)`` compiles.
    """
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    check_can_tune(target, trials, tracker, rpc_key)
    folder = database_dir(db, target, create=True, remote=tracker is not None)
    tuning_target = _stored_target(folder)
    database = _open(folder)
    before = len(database.get_all_tuning_records())
    left = trials - before
    from edgecomp.targets.cpu_schedules import register_intrinsics
    from edgecomp.targets.lowering import prepare_module

    register_intrinsics()  # a resumed run replays the database's records, Int8Dot's tensorize steps included
    with tuning_target:  # what static_shape_tuning does before it tunes (apply_database repeats it)
        mod = tvm.transform.Sequential(
            [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(), relax.get_pipeline("zero")]
        )(prepare_module(relax_model, target, int8_arith))
    tasks = ms.relax_integration.extract_tasks(mod, tuning_target, {})
    t0 = time.monotonic()
    runner_name = "built in-process, timed in a worker process (this machine)"
    if left <= 0:
        log.info("tuning: %s already holds %d records (asked for %d): nothing to do", folder, before, trials)
        return TuneReport(str(folder), target.name, len(tasks), trials, before, 0, 0.0, "none (already tuned)")
    # MetaSchedule's console handler takes the level of its logger: keep stdout for our output
    # (--json); its full log still goes to DB/<target>/logs.
    ms_log = logging.getLogger("tvm.s_tir.meta_schedule")
    # (every run: MetaSchedule's own set-up leaves the logger at DEBUG for the next one)
    ms_log.setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.WARNING)
    # MetaSchedule's create_loggers re-lists this logger's handlers by name and fails on an
    # unnamed one ("'NoneType' object has no attribute 'format'", seen in CI's pytest process).
    for handler in [h for h in ms_log.handlers if h.get_name() is None]:
        ms_log.removeHandler(handler)
    InProcessBuilder, ProgressCallback = _in_process_classes()
    from edgecomp.progress import Progress as _P

    progress = progress or _P(enabled=False)
    config = evaluator_config(target)
    stop = threading.Event()  # set by Ctrl-C (_sigint_stops)
    work = Path(tempfile.mkdtemp(prefix="edgecomp-tune-"))
    try:
        if tracker is None:
            # Built here, timed in MetaSchedule's worker process (started once, reused): a candidate
            # that crashes (measured: a MiniLM take() kernel fed random, out-of-range indices
            # segfaulted when timed in-process) costs a worker restart, not the tuning run.
            builder, runner = InProcessBuilder(work, stop), ms.runner.LocalRunner(evaluator_config=config, timeout_sec=120)
        else:
            rpc_config = ms.runner.RPCConfig(tracker_host=tracker[0], tracker_port=tracker[1], tracker_key=rpc_key,
                                             session_timeout_sec=120)
            builder = ms.builder.LocalBuilder(f_export=_cross_export(target)) if target.cross_compiler else ms.builder.LocalBuilder()
            runner = ms.runner.RPCRunner(rpc_config=rpc_config, evaluator_config=config)
            runner_name = f"RPC tracker {tracker[0]}:{tracker[1]} key {rpc_key}"
        with _sigint_stops(stop, progress):
            if target.default_pipeline == "cpu":
                with progress.stage(f"measuring the default schedules of {len(tasks)} task(s) (the records to beat)"):
                    seeded = _seed_default_schedules(tasks, tuning_target, database, builder, runner, stop)
                left -= seeded
                log.info("tuning: %d default schedule(s) measured and recorded", seeded)
            callback = ProgressCallback(left, before, progress, stop)
            if left > 0 and not stop.is_set():
                with progress.stage(f"tuning {len(tasks)} task(s) for {target.name}: {left} trials ({runner_name})"):
                    ms.relax_integration.tune_relax(
                        mod, {}, tuning_target, str(folder), max_trials_global=left,
                        max_trials_per_task=trials_per_task, num_trials_per_iter=min(64, max(4, left // max(1, len(tasks)))),  # every task gets a round
                        builder=builder, runner=runner, database=database, seed=seed,
                        measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), callback],
                    )
        if stop.is_set():  # Ctrl-C while the default schedules were measured: those are saved
            raise KeyboardInterrupt
    except (InputError, DeviceError):
        raise
    except Exception as err:  # noqa: BLE001
        if stop.is_set():  # Ctrl-C: the batches measured so far are in the database
            raise KeyboardInterrupt from None
        lines = str(err).strip().splitlines()
        raise UnsupportedModelError(f"tuning for {target.name} failed: {(lines[-1] if lines else type(err).__name__)[:300]}") from err
    finally:
        shutil.rmtree(work, ignore_errors=True)
    after = len(_open(folder).get_all_tuning_records())
    return TuneReport(str(folder), target.name, len(tasks), trials, before, after - before, round(time.monotonic() - t0, 1), runner_name)


def evaluator_config(target: Target):
    """How candidates are timed. CPU targets: with cold caches (the weights, outputs and other
    non-first arguments flushed before each run, one run per repeat): in a model a kernel's
    weights are cold, and records ranked on warm repeats lost there (MobileNetV2: tuned 7.20 ms
    against 6.28 untuned, both timed in fresh processes). GPUs: warm repeats."""
    from tvm.s_tir import meta_schedule as ms

    if target.default_pipeline == "cpu":
        return ms.runner.EvaluatorConfig(number=1, repeat=5, min_repeat_ms=0, enable_cpu_cache_flush=True)
    return ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20, enable_cpu_cache_flush=False)


def _seed_default_schedules(tasks, target, database, builder, runner, stop: threading.Event) -> int:
    """Measure edgecomp's default CPU schedule of every task not yet in ``database`` and record it.

    MetaSchedule keeps the fastest record per workload, so a tuned build is never slower, kernel
    by kernel, than the default schedules it replaces (on the same measurements): a short search
    that finds nothing better leaves the default in place. Returns the number of records added.
    """
    from tvm.s_tir import meta_schedule as ms

    from edgecomp.targets.cpu_schedules import default_rules, default_schedule

    rules = default_rules()
    todo = []
    for task in tasks:
        mod = task.dispatched[0]
        if database.has_workload(mod):
            continue
        func = mod["main"]
        _, sch = default_schedule(func, target, rules)
        if sch is not None and sch.trace is not None:
            todo.append((mod, sch, ms.arg_info.ArgInfo.from_prim_func(func)))
    added = 0
    for i in range(0, len(todo), 16):
        if stop.is_set():
            break
        batch = todo[i:i + 16]
        built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, sch, _ in batch])
        inputs, keep = [], []
        for (mod, sch, args), b in zip(batch, built):
            if b.error_msg is None:
                inputs.append(ms.runner.RunnerInput(b.artifact_path, "cpu", args))
                keep.append((mod, sch, args))
        for (mod, sch, args), future in zip(keep, runner.run(inputs) if inputs else []):
            result = future.result()
            if result.error_msg is None and result.run_secs:
                workload = database.commit_workload(mod)
                database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, result.run_secs, target, args))
                added += 1
    return added


def _cross_export(target: Target):
    """The export function of MetaSchedule's builder for a cross-compiled target (a global func name)."""
    import tvm

    name = f"edgecomp.tuning.export.{target.name}"
    if tvm.get_global_func(name, allow_missing=True) is None:
        compiler = target.cross_compiler

        def export(mod) -> str:
            path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
            mod.export_library(path, fcompile=tvm.support.cc.cross_compiler(compiler))
            return path

        tvm.register_global_func(name, export)
    return name


def apply_database(mod, target: Target, db: str | os.PathLike):
    """The raw module with the database's schedules applied (``static_shape_tuning``, 0 trials)."""
    from tvm import relax

    from edgecomp.targets.cpu_schedules import register_intrinsics

    register_intrinsics()  # records of Int8Dot kernels replay its tensorize steps

    folder = database_dir(db, target, create=False)
    return relax.get_pipeline("static_shape_tuning", total_trials=0, target=_stored_target(folder), work_dir=str(folder))(mod)
