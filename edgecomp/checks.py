"""On-device checks of a bundle: accuracy vs ONNX Runtime, latency, memory, regression vs a baseline.

``run_check`` runs the bundle's code on a device (``edgecomp.targets.devices``), compares its
outputs with ONNX Runtime's outputs of the *original* model, times it with the VM's
``time_evaluator`` on the device, and compares everything with a baseline saved by an earlier run.
Every check is a :class:`CheckResult` (data, not prints); a :class:`CheckReport` renders them as a
table, JSON or JUnit XML and gives the exit code: 0 pass, 1 a check failed (accuracy past tolerance
or a regression). Errors (device unreachable, bad bundle or baseline) are raised as
``EdgecompError`` (exit 2) before any verdict.

Latency on an emulated device is reported with ``emulated: true`` and never gates anything: qemu
runs code 10–20x slower than the real core, with noise of its own.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from edgecomp import bundle as bundle_fmt
from edgecomp.errors import BundleError, InputError
from edgecomp.numerics import Comparison, Samples, Tolerance, compare
from edgecomp.progress import Progress
from edgecomp.reference import load_npz, samples_from_arrays

__all__ = [
    "CheckResult",
    "CheckReport",
    "Thresholds",
    "LatencyStats",
    "run_check",
    "load_baseline",
    "bundle_tolerance",
    "write_junit",
    "BASELINE_FORMAT",
]

BASELINE_FORMAT = "edgecomp-check-baseline"
BASELINE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """How much worse than the baseline counts as a regression.

    Latency is judged on the median of ``repeats`` timed repeats, as a ratio to the baseline's
    median, and only when the two distributions do not overlap (this run's 10th percentile above
    the baseline's 90th): a lone slow time or a noisy run is not a regression.
    """

    max_latency_ratio: float = 1.5
    max_cosine_drop: float = 1e-4
    max_top1_drop: float = 0.0

    def to_json(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CheckResult:
    """One check: what was measured (``value``), what it was held to (``limit``), and the verdict.

    ``ok`` is True (pass), False (fail) or None (skipped: not measurable here, e.g. memory on a
    device that does not report it, or latency regression on an emulated device).
    """

    name: str
    kind: str  # accuracy | latency | memory | regression
    ok: bool | None
    value: float | None
    limit: float | None
    message: str
    unit: str = ""
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return {True: "pass", False: "fail", None: "skip"}[self.ok]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "status": self.status,
            "ok": self.ok,
            "value": _num(self.value),
            "limit": _num(self.limit),
            "unit": self.unit,
            "message": self.message,
            "details": {k: _num(v) for k, v in self.details.items()},
        }


def _num(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isinf(x) else "nan"
    return x


@dataclasses.dataclass
class LatencyStats:
    """Per-repeat times (each the mean of ``number`` runs), in milliseconds."""

    times_ms: list[float]
    number: int
    warmup: int
    threads: int | None
    emulated: bool

    @property
    def median_ms(self) -> float:
        return float(np.median(self.times_ms))

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.times_ms, q))

    def to_json(self) -> dict[str, Any]:
        t = np.asarray(self.times_ms)
        return {
            "median_ms": self.median_ms,
            "p10_ms": self.percentile(10),
            "p90_ms": self.percentile(90),
            "min_ms": float(t.min()),
            "max_ms": float(t.max()),
            "mean_ms": float(t.mean()),
            "std_ms": float(t.std()),
            "spread": float((self.percentile(90) - self.percentile(10)) / self.median_ms) if self.median_ms > 0 else None,
            "repeats": len(self.times_ms),
            "number": self.number,
            "warmup": self.warmup,
            "threads": self.threads,
            "emulated": self.emulated,
            "times_ms": [float(x) for x in self.times_ms],
        }


@dataclasses.dataclass
class CheckReport:
    """Everything one ``edgecomp check`` found; ``exit_code`` is the CI verdict."""

    bundle: str
    device: dict[str, Any]
    checks: list[CheckResult]
    accuracy: dict[str, Any]
    latency: dict[str, Any] | None
    memory: dict[str, Any] | None
    model: dict[str, Any]
    baseline: str | None = None
    baseline_saved: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.ok is False]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def to_json(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle,
            "model": self.model,
            "device": self.device,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "checks": [c.to_json() for c in self.checks],
            "failures": [f"{c.name}: {c.message}" for c in self.failures],
            "accuracy": self.accuracy,
            "latency": self.latency,
            "memory": self.memory,
            "baseline": self.baseline,
            "baseline_saved": self.baseline_saved,
            "notes": self.notes,
            "seconds": self.seconds,
        }

    def junit_xml(self) -> str:
        """JUnit XML: one testsuite, one testcase per check (failure / skipped elements)."""
        suite = ET.Element(
            "testsuite",
            {
                "name": f"edgecomp check {self.model.get('name', '')} on {self.device.get('spec', '')}",
                "tests": str(len(self.checks)),
                "failures": str(len(self.failures)),
                "errors": "0",
                "skipped": str(sum(c.ok is None for c in self.checks)),
                "time": f"{self.seconds:.3f}",
                "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            },
        )
        props = ET.SubElement(suite, "properties")
        for k, v in (("bundle", self.bundle), ("device", self.device.get("spec")), ("arch", self.device.get("arch")),
                     ("emulated", self.device.get("emulated")), ("baseline", self.baseline)):
            if v is not None:
                ET.SubElement(props, "property", {"name": k, "value": str(v)})
        for c in self.checks:
            case = ET.SubElement(suite, "testcase", {"classname": f"edgecomp.check.{c.kind}", "name": c.name, "time": f"{c.seconds:.3f}"})
            if c.ok is False:
                el = ET.SubElement(case, "failure", {"message": c.message, "type": f"{c.kind}-regression" if c.kind == "regression" else c.kind})
                el.text = _describe(c)
            elif c.ok is None:
                ET.SubElement(case, "skipped", {"message": c.message})
            out = ET.SubElement(case, "system-out")
            out.text = _describe(c)
        root = ET.Element("testsuites", {"name": "edgecomp check", "tests": suite.get("tests"), "failures": suite.get("failures"),
                                         "errors": "0", "skipped": suite.get("skipped"), "time": suite.get("time")})
        root.append(suite)
        ET.indent(root)
        return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"

    def table(self) -> str:
        """The human report: one row per check, then the verdict."""
        d = self.device
        where = d.get("spec", "?")
        extra = []
        if d.get("machine"):
            extra.append(d["machine"])
        if d.get("emulated"):
            extra.append(f"emulated by qemu-aarch64, cpu {d.get('qemu_cpu')}")
        if d.get("threads") is not None:
            extra.append(f"{d['threads']} threads")
        lines = [f"bundle {self.bundle} ({self.model.get('name')}, target {self.model.get('target')}) on {where}"
                 + (f" ({', '.join(extra)})" if extra else "")]
        rows = [(c.name, _fmt(c.value, c.unit), _limit(c), c.status.upper() if c.ok is not True else "pass", c.message) for c in self.checks]
        w = [max(len(r[i]) for r in rows + [("check", "value", "limit", "result", "")]) for i in range(4)]
        lines.append(f"  {'check':<{w[0]}}  {'value':>{w[1]}}  {'limit':<{w[2]}}  {'result':<{w[3]}}  note")
        for r in rows:
            lines.append(f"  {r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:<{w[2]}}  {r[3]:<{w[3]}}  {r[4]}")
        if self.latency:
            lat = self.latency
            label = "EMULATED latency (qemu; not a speed measurement)" if lat.get("emulated") else "latency"
            lines.append(
                f"{label}: median {lat['median_ms']:.4g} ms, p10–p90 {lat['p10_ms']:.4g}–{lat['p90_ms']:.4g} ms "
                f"({lat['repeats']} repeats of {lat['number']} runs after {lat['warmup']} warm-up, {lat['threads']} threads)"
            )
        for n in self.notes:
            lines.append(f"note: {n}")
        if self.baseline_saved:
            lines.append(f"baseline saved to {self.baseline_saved}")
        n_fail, n_skip = len(self.failures), sum(c.ok is None for c in self.checks)
        verdict = "PASS" if self.ok else "FAIL"
        lines.append(f"{verdict}: {len(self.checks) - n_fail - n_skip} passed, {n_fail} failed, {n_skip} skipped (exit {self.exit_code})")
        return "\n".join(lines)


def _fmt(v: Any, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "bytes":
        return f"{v / 2**20:.1f} MiB"
    if isinstance(v, float):
        s = f"{v:.6f}" if unit in ("cosine", "fraction") else f"{v:.3g}"
    else:
        s = str(v)
    return s + (f" {unit}" if unit in ("ms", "x") else "")


def _limit(c: CheckResult) -> str:
    if c.limit is None:
        return ""
    op = "≥" if c.unit in ("cosine", "fraction") else "≤"
    return f"{op} {_fmt(c.limit, c.unit)}"


def _describe(c: CheckResult) -> str:
    parts = [f"{c.name}: {c.status}", f"value {_fmt(c.value, c.unit)}"]
    if c.limit is not None:
        parts.append(f"limit {_limit(c)}")
    parts.append(c.message)
    if c.details:
        parts.append(json.dumps({k: _num(v) for k, v in c.details.items()}, default=str))
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# inputs and references


def bundle_tolerance(manifest: dict[str, Any]) -> Tolerance:
    """What the device's outputs are held to, from the build (null = unbounded).

    A bundle built with exact passes only must reproduce ORT on the original model as closely as
    the build's own check did (``tolerance``); one built with lossy passes gets the accuracy
    budget the build allowed them (``accuracy``).
    """
    lossy = any(p.get("lossy") for p in manifest.get("passes") or [])
    t = (manifest.get("accuracy") if lossy else manifest.get("tolerance")) or {}
    base = Tolerance()

    def get(k: str, default: float) -> float:
        v = t.get(k, default)
        return math.inf if v is None else float(v)

    return Tolerance(atol=get("atol", base.atol), rtol=get("rtol", base.rtol),
                     min_cosine=get("min_cosine", base.min_cosine), min_top1=get("min_top1", base.min_top1))


def _original_model(manifest: dict[str, Any]) -> Path | None:
    m = manifest.get("model") or {}
    if m.get("example"):
        from edgecomp.examples import get_example

        return get_example(m["example"]).model_path
    p = Path(m.get("path") or "")
    if p.is_file():
        from edgecomp.importer import sha256_file

        if m.get("sha256") and sha256_file(p) != m["sha256"]:
            return None
        return p
    return None


def _samples(b: bundle_fmt.Bundle, inputs: str | os.PathLike | dict | None) -> tuple[Samples, list[list[np.ndarray]], str]:
    """(feeds, reference outputs per sample, where they came from)."""
    out_names = [o.name for o in b.outputs]
    if inputs is None:
        arrays, refs = b.reference()
        samples = samples_from_arrays(arrays, b.inputs, "bundle reference inputs")
        missing = [n for n in out_names if n not in refs]
        if missing:
            raise BundleError(f"{b.root}: reference outputs lack {', '.join(missing)}")
        return samples, [[refs[n][i] for n in out_names] for i in range(len(samples))], "bundle reference inputs"
    if isinstance(inputs, dict):
        arrays, source = dict(inputs), "given arrays"
    else:
        arrays, source = load_npz(inputs), str(inputs)
    samples = samples_from_arrays({s.name: arrays[s.name] for s in b.inputs if s.name in arrays} or arrays, b.inputs, source)
    if all(n in arrays for n in out_names):  # the user brought the expected outputs too
        refs = {}
        for o in b.outputs:
            a = np.asarray(arrays[o.name])
            refs[o.name] = a[None] if a.shape == tuple(o.shape) else a
            if len(refs[o.name]) != len(samples):
                raise InputError(f"{source}: {len(samples)} input samples but {len(refs[o.name])} for output {o.name!r}")
        return samples, [[refs[n][i] for n in out_names] for i in range(len(samples))], source
    model = _original_model(b.manifest)
    if model is None:
        raise InputError(
            f"{source} holds no expected outputs ({', '.join(out_names)}) and the original model "
            f"{(b.manifest.get('model') or {}).get('path')} is not available (or changed) to compute them with ONNX "
            "Runtime; add the outputs to the .npz"
        )
    from edgecomp.importer import load_onnx
    from edgecomp.numerics import run_ort

    return samples, run_ort(load_onnx(model), samples, out_names), f"{source} (reference: ONNX Runtime on {model.name})"


# ---------------------------------------------------------------------------------------------
# baselines


def load_baseline(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a baseline file (one-line InputError when it is not one)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(f"baseline file not found: {p}") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"baseline {p} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT:
        raise InputError(f"{p} is not an edgecomp check baseline (write one with 'edgecomp check --save-baseline')")
    if data.get("version") != BASELINE_VERSION:
        raise InputError(f"baseline {p}: version {data.get('version')} is not supported (this edgecomp reads {BASELINE_VERSION})")
    for key in ("model", "device", "accuracy"):
        if not isinstance(data.get(key), dict):
            raise InputError(f"baseline {p}: missing or malformed {key!r}")
    lat = data.get("latency")
    if lat is not None:
        for k in ("median_ms", "p10_ms", "p90_ms"):
            v = lat.get(k) if isinstance(lat, dict) else None
            if not isinstance(v, (int, float)) or not v > 0:
                raise InputError(f"baseline {p}: latency.{k} must be a positive number, got {v!r}")
    return data


def _baseline_record(report: CheckReport, manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": BASELINE_FORMAT,
        "version": BASELINE_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "model": report.model,
        "code_sha256": (manifest.get("files") or {}).get(bundle_fmt.CODE, {}).get("sha256"),
        "device": {k: report.device.get(k) for k in ("spec", "kind", "arch", "emulated", "machine", "threads", "qemu_cpu")},
        "accuracy": {o["name"]: {k: o.get(k) for k in ("max_abs", "min_cosine", "mean_cosine", "top1")} for o in report.accuracy["outputs"]},
        "samples": report.accuracy["samples"],
        "latency": {k: v for k, v in (report.latency or {}).items() if k != "times_ms"} or None,
    }


def _check_baseline_matches(base: dict[str, Any], model: dict[str, Any], device: dict[str, Any], path: str) -> None:
    bm, bd = base["model"], base["device"]
    if bm.get("name") != model.get("name") or bm.get("target") != model.get("target"):
        raise InputError(
            f"baseline {path} is for model {bm.get('name')!r} built for {bm.get('target')!r}; this bundle is "
            f"{model.get('name')!r} for {model.get('target')!r}"
        )
    if sorted(base["accuracy"]) != sorted(model.get("outputs", [])):
        raise InputError(f"baseline {path} has outputs {sorted(base['accuracy'])}; the bundle has {model.get('outputs')}")
    if bool(bd.get("emulated")) != bool(device.get("emulated")) or (bd.get("arch") and device.get("arch") and bd["arch"] != device["arch"]):
        raise InputError(
            f"baseline {path} was measured on {bd.get('spec')} ({bd.get('arch')}{', emulated' if bd.get('emulated') else ''}); "
            f"this check runs on {device.get('spec')} ({device.get('arch')}{', emulated' if device.get('emulated') else ''}): "
            "keep one baseline per device"
        )


def _regressions(base: dict[str, Any], report: CheckReport, th: Thresholds, path: str) -> list[CheckResult]:
    checks: list[CheckResult] = []
    for o in report.accuracy["outputs"]:
        b = base["accuracy"].get(o["name"], {})
        if b.get("min_cosine") is not None and o.get("min_cosine") is not None:
            drop = float(b["min_cosine"]) - float(o["min_cosine"])
            checks.append(CheckResult(
                f"regression.{o['name']}.cosine_drop", "regression", bool(drop <= th.max_cosine_drop), drop, th.max_cosine_drop,
                f"min cosine {o['min_cosine']:.6f} vs baseline {b['min_cosine']:.6f}",
                details={"baseline": b["min_cosine"], "now": o["min_cosine"]},
            ))
        if b.get("top1") is not None and o.get("top1") is not None:
            drop = float(b["top1"]) - float(o["top1"])
            checks.append(CheckResult(
                f"regression.{o['name']}.top1_drop", "regression", bool(drop <= th.max_top1_drop + 1e-12), drop, th.max_top1_drop,
                f"top-1 agreement {o['top1']:.4f} vs baseline {b['top1']:.4f}",
                details={"baseline": b["top1"], "now": o["top1"]},
            ))
    bl, lat = base.get("latency"), report.latency
    if bl and lat:
        ratio = lat["median_ms"] / bl["median_ms"]
        low = lat["p10_ms"] / bl["p90_ms"]  # the least slowdown the two distributions allow
        details = {"ratio_median": ratio, "ratio_p10_vs_baseline_p90": low, "baseline_median_ms": bl["median_ms"],
                   "baseline_p90_ms": bl["p90_ms"], "median_ms": lat["median_ms"], "p10_ms": lat["p10_ms"],
                   "baseline_threads": bl.get("threads"), "threads": lat.get("threads")}
        if lat.get("emulated"):
            checks.append(CheckResult("regression.latency", "regression", None, ratio, th.max_latency_ratio,
                                      "skipped: emulated latency is not a speed measurement", unit="x", details=details))
        else:
            slower = ratio > th.max_latency_ratio and low > 1.0
            msg = (f"median {lat['median_ms']:.4g} ms vs baseline {bl['median_ms']:.4g} ms ({ratio:.2f}x); "
                   f"p10 {lat['p10_ms']:.4g} ms vs baseline p90 {bl['p90_ms']:.4g} ms")
            if ratio > th.max_latency_ratio and not slower:
                msg += " (distributions overlap: noise, not a regression)"
            if bl.get("threads") is not None and lat.get("threads") is not None and bl["threads"] != lat["threads"]:
                msg += f"; threads {lat['threads']} vs baseline {bl['threads']}"
            checks.append(CheckResult("regression.latency", "regression", not slower, ratio, th.max_latency_ratio, msg,
                                      unit="x", details=details))
    elif bl is None and lat:
        checks.append(CheckResult("regression.latency", "regression", None, None, th.max_latency_ratio,
                                  f"skipped: baseline {path} has no latency"))
    return checks


# ---------------------------------------------------------------------------------------------
# the run


def _run_on_device(session, b: bundle_fmt.Bundle, samples: Samples, repeats: int, warmup: int, number: int | None,
                   min_repeat_ms: float, progress: Progress) -> tuple[list[list[np.ndarray]], LatencyStats, float]:
    from tvm import relax

    entry = b.manifest["runtime"]["entry"]
    with progress.stage(f"loading {bundle_fmt.CODE} on the device"):
        lib = session.load_module(b.root / b.manifest["runtime"]["code"])
        with session.guard("creating the VM"):
            vm = relax.VirtualMachine(lib, session.dev)
        weights = b.weights()  # decoded (and checked) when entropy-coded
        params = [session.tensor(weights[p["key"]]) for p in b.manifest["params"]]
    t0 = time.perf_counter()
    got: list[list[np.ndarray]] = []
    with progress.stage(f"running {len(samples)} samples on the device"):
        for feed in samples:
            args = [session.tensor(feed[s.name]) for s in b.inputs]
            with session.guard("running the model"):
                got.append(bundle_fmt._flatten(vm[entry](*args, *params)))
    run_s = time.perf_counter() - t0

    with progress.stage(f"timing on the device ({warmup} warm-up, {repeats} repeats)"):
        args = [session.tensor(samples[0][s.name]) for s in b.inputs]
        with session.guard("timing the model"):
            vm.save_function(entry, "edgecomp_timed", *args, *params, include_return=False)
            dev = session.dev
            if warmup > 0:
                first = vm.time_evaluator("edgecomp_timed", dev, number=1, repeat=warmup)()
                one_s = float(np.median(first.results))
            else:
                one_s = float(vm.time_evaluator("edgecomp_timed", dev, number=1, repeat=1)().results[0])
            if number is None:
                number = int(min(1000, max(1, math.ceil(min_repeat_ms / 1e3 / max(one_s, 1e-9)))))
            res = vm.time_evaluator("edgecomp_timed", dev, number=number, repeat=repeats)()
        times = [float(t) * 1e3 for t in res.results]
    stats = LatencyStats(times, number, warmup, None, bool(session.device.emulated))
    del vm, lib, params, args
    return got, stats, run_s


def run_check(
    bundle: str | os.PathLike,
    device: Any = "local",
    *,
    inputs: str | os.PathLike | dict | None = None,
    baseline: str | os.PathLike | None = None,
    save_baseline: str | os.PathLike | None = None,
    repeats: int = 30,
    warmup: int = 3,
    number: int | None = None,
    min_repeat_ms: float = 5.0,
    tolerance: Tolerance | None = None,
    thresholds: Thresholds = Thresholds(),
    max_latency_ms: float | None = None,
    connect_timeout: float | None = None,
    timeout: float | None = None,
    progress: Progress | None = None,
) -> CheckReport:
    """Run ``bundle`` on ``device`` and check it; see :func:`edgecomp.api.check`."""
    from edgecomp.targets.devices import EmuArm64Device, parse_device

    progress = progress or Progress(enabled=False)
    t_start = time.perf_counter()
    if repeats < 3:
        raise InputError("--repeats must be at least 3 (a median and a spread need several repeats)")
    if warmup < 0:
        raise InputError("--warmup must be 0 or more")
    if number is not None and number < 1:
        raise InputError("--number must be at least 1")
    for name, v in (("--max-latency-ratio", thresholds.max_latency_ratio), ("--connect-timeout", connect_timeout), ("--timeout", timeout)):
        if v is not None and not v > 0:
            raise InputError(f"{name} must be positive")
    dev = parse_device(device)
    if connect_timeout is not None:
        dev.connect_timeout = connect_timeout
    if timeout is not None:
        dev.timeout = timeout
    base = load_baseline(baseline) if baseline is not None else None

    b = bundle_fmt.load_bundle(bundle)
    try:
        m = b.manifest
        tol = tolerance or bundle_tolerance(m)
        samples, reference, source = _samples(b, inputs)
        out_names = [o.name for o in b.outputs]
        model = {"name": (m.get("model") or {}).get("name"), "target": m["target"]["name"], "arch": m["target"]["arch"],
                 "tvm_target": m["target"].get("tvm_target"), "outputs": out_names}
        if isinstance(dev, EmuArm64Device):
            dev.for_target(m["target"].get("tvm_target"))
        if base is not None:  # a baseline for another model or device fails before the device is touched
            _check_baseline_matches(base, model, dev.describe(), str(baseline))
        device_kind = m["target"].get("device", "cpu")
        if device_kind != "cpu":  # sessions place tensors on the device's CPU (remote.cpu())
            raise BundleError(
                f"bundle {bundle} holds {device_kind} kernels (target {m['target']['name']!r}); edgecomp check "
                f"runs CPU code only (its sessions use the device's CPU): load model.so on the GPU machine with "
                f"a TVM runtime built with {device_kind}"
            )
        if dev.arch is not None and dev.arch != b.target_arch:
            raise BundleError(
                f"bundle {bundle} holds {b.target_arch} code (target {m['target']['name']!r}); device {dev.spec} is "
                f"{dev.arch} and cannot run it"
            )
        started_here = not dev.started
        if started_here:
            dev.start(wait=False)  # an emulated device boots while this process loads TVM
        try:
            with progress.stage("loading TVM"):
                import tvm.rpc  # noqa: F401
                from tvm import relax  # noqa: F401
            with progress.stage(f"starting device {dev.spec}"):
                dev.wait_ready()
            with progress.stage(f"connecting to {dev.spec}"):
                session = dev.connect()
            with session:
                info = session.info()
                got, stats, run_s = _run_on_device(session, b, samples, repeats, warmup, number, min_repeat_ms, progress)
                stats.threads = info.get("threads")
                mem = session.memory()
        finally:
            if started_here:
                dev.stop()
    finally:
        b.close()

    device_info = {**dev.describe(), **{k: v for k, v in info.items() if k in ("machine", "threads", "tvm", "python", "cpu_count")}}
    if dev.kind == "local":
        device_info["machine"] = platform.machine()
    cmp: Comparison = compare(out_names, reference, got, tol)
    checks = _accuracy_checks(cmp, reference, got, run_s / max(1, len(samples)))
    lat = stats.to_json()
    lat_check = CheckResult(
        "latency", "latency", True, stats.median_ms, None,
        (f"EMULATED (qemu {device_info.get('qemu_cpu')}), not a speed measurement; " if stats.emulated else "")
        + f"p10–p90 {lat['p10_ms']:.4g}–{lat['p90_ms']:.4g} ms, {lat['repeats']}x{lat['number']} runs, {stats.threads} threads",
        unit="ms", details={k: v for k, v in lat.items() if k != "times_ms"}, seconds=sum(stats.times_ms) * stats.number / 1e3,
    )
    if max_latency_ms is not None:
        lat_check.limit = max_latency_ms
        if stats.emulated:
            lat_check.ok = None
            lat_check.message = "skipped: emulated latency is not a speed measurement (--max-latency-ms applies to real devices)"
        else:
            lat_check.ok = stats.median_ms <= max_latency_ms
    checks.append(lat_check)
    if mem is None:
        checks.append(CheckResult("memory.peak_rss", "memory", None, None, None, f"skipped: {dev.spec} does not report memory"))
    else:
        checks.append(CheckResult("memory.peak_rss", "memory", True, mem["peak_rss_bytes"], None,
                                  f"high-water mark of {mem['scope']}", unit="bytes", details=dict(mem)))
    report = CheckReport(
        bundle=str(bundle), device=device_info, checks=checks, accuracy={**cmp.to_json(), "source": source},
        latency=lat, memory=mem, model=model, baseline=str(baseline) if baseline is not None else None,
    )
    if stats.emulated:
        report.notes.append("latency measured under emulation (qemu-user): for correctness only, never a speed claim")
    if base is not None:
        report.checks.extend(_regressions(base, report, thresholds, str(baseline)))
    report.seconds = time.perf_counter() - t_start
    if save_baseline is not None:
        if report.ok:
            _write_json(Path(save_baseline), _baseline_record(report, m))
            report.baseline_saved = str(save_baseline)
        else:
            report.notes.append(f"baseline not saved to {save_baseline}: checks failed")
    return report


def _accuracy_checks(cmp: Comparison, reference, got, per_sample_s: float) -> list[CheckResult]:
    tol = cmp.tolerance
    checks = []
    for j, om in enumerate(cmp.outputs):
        scale = max(float(np.max(np.abs(np.asarray(r[j], np.float64)))) if np.asarray(r[j]).size else 0.0 for r in reference)
        rel = om.max_abs / scale if scale > 0 else (0.0 if om.max_abs == 0 else math.inf)
        ok_abs = bool(om.max_abs <= om.bound)
        checks.append(CheckResult(
            f"accuracy.{om.name}.max_abs_error", "accuracy", ok_abs, om.max_abs, om.bound,
            f"output {om.name}: max |device - ORT| {om.max_abs:.3g} (relative to max|ORT| {rel:.3g}); bound atol {tol.atol:g} + rtol {tol.rtol:g}·{scale:.3g}",
            details={"max_rel": rel, "scale": scale, "samples": cmp.samples}, seconds=per_sample_s * cmp.samples,
        ))
        checks.append(CheckResult(
            f"accuracy.{om.name}.cosine", "accuracy", bool(om.min_cosine >= tol.min_cosine), om.min_cosine, tol.min_cosine,
            f"output {om.name}: min cosine per sample {om.min_cosine:.6f} (mean {om.mean_cosine:.6f})", unit="cosine",
            details={"mean_cosine": om.mean_cosine},
        ))
        if om.top1 is not None:
            checks.append(CheckResult(
                f"accuracy.{om.name}.top1", "accuracy", bool(om.top1 >= tol.min_top1), om.top1, tol.min_top1,
                f"output {om.name}: top-1 agreement with ORT {om.top1:.4f} over {cmp.samples} samples", unit="fraction",
            ))
    return checks


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=_num) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_junit(report: CheckReport | None, path: str | os.PathLike, error: str | None = None, device: str = "", bundle: str = "") -> None:
    """Write JUnit XML for a report, or for an error that stopped the check before any verdict."""
    if report is not None:
        text = report.junit_xml()
    else:
        suite = ET.Element("testsuite", {"name": f"edgecomp check {bundle} on {device}", "tests": "1", "failures": "0", "errors": "1", "skipped": "0"})
        case = ET.SubElement(suite, "testcase", {"classname": "edgecomp.check.device", "name": "check"})
        el = ET.SubElement(case, "error", {"message": error or "error", "type": "error"})
        el.text = error
        root = ET.Element("testsuites", {"name": "edgecomp check", "tests": "1", "failures": "0", "errors": "1", "skipped": "0"})
        root.append(suite)
        ET.indent(root)
        text = '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
