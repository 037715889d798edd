"""What the firmware outputs cost and deliver: sizes, build time, and the C API's latency against
the Python bundle running the same compiled module, host CPU, one run.

    python tools/bench_firmware.py                 # digits-cnn, mobilenetv2, minilm (fetched into bench/cache)
    python tools/bench_firmware.py --quick         # digits-cnn only
    python tools/bench_firmware.py --report-only bench/results/firmware-<date>.json

Per model, in one process and one run:

- ``build`` wall time of ``edgecomp.build(target="host")`` without and with ``emit="firmware"``
  (the latter includes compiling the system library, the glue, and building and running the C
  example on every reference sample);
- sizes: the bundle's ``model.so`` + ``weights.npz`` against ``firmware/``: ``libNAME.a`` (code +
  glue), the weights file, ``libNAME_weights.a``, and the TVM runtime libraries shipped;
- latency per sample on one thread (``TVM_NUM_THREADS=1``): the C example (``main.c``, its own
  monotonic clock around ``NAME_run`` over ``--reps`` samples: input copy in, VM call, output copy
  out) against ``Bundle.run`` in Python on the same samples (numpy → tensor, VM call, tensor →
  numpy). Same TVM pipeline, same kernels: the difference is the calling layer. Ratios, not
  lone times: this machine is noisy.

Writes bench/results/firmware-<date>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODELS = ("digits-cnn", "mobilenetv2", "minilm")


def _measure(name: str, reps: int, work: Path) -> dict[str, Any]:
    import edgecomp
    from edgecomp import bundle as bundle_fmt
    from edgecomp.bench.models import fetch
    from edgecomp.reference import load_npz, samples_from_arrays
    from edgecomp.targets import get_target
    from edgecomp.targets.firmware import build_example, run_example

    assets = fetch(name, quiet=True)
    shapes = {i["name"]: tuple(i["shape"]) for i in assets.meta["inputs"]}
    arrays = assets.arrays("eval")
    ref = work / f"{name}-ref.npz"
    np.savez(ref, **{k: v[:reps] for k, v in arrays.items() if k in shapes})

    t0 = time.perf_counter()
    plain = edgecomp.build(assets.onnx, target="host", output=work / f"{name}-plain", input_shapes=shapes, reference_inputs=ref)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    fw = edgecomp.build(assets.onnx, target="host", output=work / f"{name}-fw", input_shapes=shapes, reference_inputs=ref,
                        emit="firmware")
    t_fw = time.perf_counter() - t0

    info = fw.manifest["firmware"]
    fname, files = info["name"], fw.manifest["files"]
    size = {rel: files[rel]["bytes"] for rel in files}
    sizes = {
        "model.so": size["model.so"],
        "weights.npz": size["weights.npz"],
        f"lib{fname}.a": size[f"firmware/lib/lib{fname}.a"],
        f"{fname}.weights": size[f"firmware/weights/{fname}.weights"],
        f"lib{fname}_weights.a": size[f"firmware/lib/lib{fname}_weights.a"],
        "runtime libraries": sum(v for k, v in size.items() if k.startswith("firmware/runtime/lib/")),
    }

    b = bundle_fmt.load_bundle(fw.path)
    samples = samples_from_arrays(load_npz(ref), b.inputs, "eval")
    b.run(samples[:1])  # warm-up
    t0 = time.perf_counter()
    py_out = b.run(samples)
    py_ms = (time.perf_counter() - t0) * 1e3 / len(samples)
    b.close()

    tgt = get_target("host")
    weights = fw.path / "firmware" / "weights" / f"{fname}.weights"
    exe = build_example(fw.path / "firmware", fname, tgt, work, linked=False)
    raw = b"".join(np.ascontiguousarray(feed[s.name], dtype=s.dtype).tobytes() for feed in samples for s in b.inputs)
    run_example(exe, tgt.arch, raw[: len(raw) // len(samples)], weights)  # warm-up
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "in.bin").write_bytes(raw)
        proc = subprocess.run([str(exe), f"{d}/in.bin", f"{d}/out.bin", str(weights)], capture_output=True, text=True, check=True)
        c_ms = float(proc.stdout.split(",")[1].split()[0])  # "N samples, X ms per sample, ..."
        c_raw = (Path(d) / "out.bin").read_bytes()
    py_raw = b"".join(np.ascontiguousarray(o).tobytes() for row in py_out for o in row)
    same_layout = len(c_raw) == len(py_raw) and all(o.dtype == "float32" for o in b.outputs)
    flat = [np.frombuffer(x, dtype=np.float32) for x in (c_raw, py_raw)] if same_layout else []
    return {
        "model": name,
        "firmware_name": fname,
        "inputs": {k: list(v) for k, v in shapes.items()},
        "build_seconds": {"bundle": round(t_plain, 2), "bundle+firmware": round(t_fw, 2)},
        "sizes": sizes,
        "samples": len(samples),
        "latency_ms": {"c_api": round(c_ms, 4), "python_bundle": round(py_ms, 4)},
        "c_vs_python": round(c_ms / py_ms, 3),
        "identical_outputs": c_raw == py_raw,
        "max_abs_c_vs_python": float(np.abs(flat[0].astype(np.float64) - flat[1]).max()) if same_layout else None,
        "verification": info["verification"],
        "plain_bundle_verification": plain.manifest["verification"]["numerics"]["ok"],
    }


def _report(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        f"# Firmware outputs, {doc['date']}", "",
        f"Machine: {m['cpu']}, {m['cores']} cores; one TVM thread (`TVM_NUM_THREADS=1`). Command: `{doc['command']}`.",
        "Host target; all numbers from one run of this script. C API = `edgecomp/examples/firmware/main.c` timing "
        "`NAME_run`; Python = `Bundle.run` on the same samples (same TVM pipeline and kernels).", "",
        "| model | bundle build s | +firmware build s | model.so | libNAME.a | weights file | runtime libs | C API ms/sample | Python ms/sample | C/Python | max abs C vs Python |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        if "error" in r:
            lines.append(f"| {r['model']} | FAILED: {r['error']} |")
            continue
        s = r["sizes"]
        lib = s[f"lib{r['firmware_name']}.a"]
        w = s[f"{r['firmware_name']}.weights"]
        lines.append(
            f"| {r['model']} | {r['build_seconds']['bundle']} | {r['build_seconds']['bundle+firmware']} | {s['model.so']:,} | {lib:,} | "
            f"{w:,} | {s['runtime libraries']:,} | {r['latency_ms']['c_api']} | {r['latency_ms']['python_bundle']} | "
            f"{r['c_vs_python']} | {r['max_abs_c_vs_python']} |"
        )
    lines += ["", "Build-time verification of each firmware (C example vs ONNX Runtime, reference samples):", ""]
    for r in doc["results"]:
        if "error" not in r:
            v = r["verification"]
            worst = max(o["max_abs"] for how in ("file", "linked") for o in v[how]["outputs"])
            lines.append(f"- {r['model']}: {v['ran']}; file {v['file']['samples']} samples, linked {v['linked']['samples']}; "
                         f"max abs error {worst:.2e}, ok={v['file']['ok'] and v['linked']['ok']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="digits-cnn only")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--reps", type=int, default=8, help="samples timed per model (default 8)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--report-only", metavar="JSON")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = "1"
    from edgecomp.bench.report import write_atomic
    from edgecomp.bench.runner import _machine

    if args.report_only:
        doc = json.loads(Path(args.report_only).read_text())
        write_atomic(Path(args.report_only).with_suffix(".md"), _report(doc))
        return 0
    models = ["digits-cnn"] if args.quick else [m.strip() for m in args.models.split(",") if m.strip()]
    results = []
    with tempfile.TemporaryDirectory(prefix="edgecomp-bench-fw-") as work:
        import edgecomp

        # warm-up: TVM's first import and compile in this process would be charged to the first build
        edgecomp.build(example="digits", target="host", output=Path(work) / "warm-up")
        for name in models:
            print(f"bench_firmware: {name} ...", file=sys.stderr, flush=True)
            try:
                results.append(_measure(name, args.reps, Path(work)))
            except Exception as err:  # noqa: BLE001  (a failed model is a row, not the end of the run)
                results.append({"model": name, "error": f"{type(err).__name__}: {err}"[:300]})
    import datetime

    date = datetime.date.today().isoformat()
    doc = {"date": date, "command": "python tools/bench_firmware.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": _machine(), "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"firmware-{date}.json", json.dumps(doc, indent=2) + "\n")
    write_atomic(out / f"firmware-{date}.md", _report(doc))
    print(_report(doc))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
