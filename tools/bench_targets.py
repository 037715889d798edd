"""Every target × the benchmark models: does it compile, how long, how big, what kind of code.

    python tools/bench_targets.py                       # digits-cnn, mobilenetv2, minilm × every target
    python tools/bench_targets.py --models digits-cnn --targets arm64,cuda
    python tools/bench_targets.py --report-only bench/results/targets-<date>.json

Each cell is one ``edgecomp.build`` (the real path: import, cleanup passes, ``tvm.compile``, link,
kernel source written and compiled here for GPU targets, verification against ONNX Runtime on one
reference sample: natively for ``host``, for every other target by the same Relax module compiled
for the host). Recorded per cell, from the build's own stage timings and manifest:

- ``build_s`` the whole build; ``compile_s`` the ``tvm.compile`` stage alone; ``link_s``;
  ``kernel_compile_s`` nvcc / clang on the kernel source (GPU targets);
- ``code_bytes`` ``model.so`` (host code; for GPU targets it also holds the kernel source, which
  the device compiles when it loads it); ``kernel_source_bytes`` and the number of kernels;
  ``kernel_binary_bytes`` what the compiler here made of them (cubin; SPIR bitcode for OpenCL);
- ``elf_arch`` of ``model.so`` read from its header; ``ok`` or the error, one line.

A failed cell is data, not the end of the run. Compile times are wall times on this machine with
2 cores shared with other work: compare them within one run, not across machines.
Writes bench/results/targets-<date>.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODELS = ("digits-cnn", "mobilenetv2", "minilm")


def _stage(timings: list[tuple[str, float]], prefix: str) -> float | None:
    hits = [dt for title, dt in timings if title.startswith(prefix)]
    return round(sum(hits), 3) if hits else None


def _cell(model: str, assets: Any, target: str, ref: Path, work: Path) -> dict[str, Any]:
    """One build; its numbers, or the error as one line."""
    import edgecomp
    from edgecomp.progress import Progress
    from edgecomp.targets.lowering import elf_arch

    shapes = {i["name"]: tuple(i["shape"]) for i in assets.meta["inputs"]}
    progress = Progress(enabled=False)  # still records every stage's time
    out = work / f"{model}-{target}"
    t0 = time.perf_counter()
    try:
        built = edgecomp.build(assets.onnx, target=target, output=out, input_shapes=shapes, reference_inputs=ref,
                               num_samples=1, force=True, progress=progress)
    except Exception as err:  # noqa: BLE001  (a failed cell is a row, not the end of the run)
        text = (str(err).strip().splitlines() or [""])[0]
        return {"model": model, "target": target, "ok": False, "error": f"{type(err).__name__}: {text}"[:400],
                "build_s": round(time.perf_counter() - t0, 2)}
    build_s = time.perf_counter() - t0
    m = built.manifest
    k = m["target"].get("kernels") or {}
    comp = k.get("compile") or {}
    numerics = m["verification"]["numerics"]
    return {
        "model": model,
        "target": target,
        "ok": True,
        "device": m["target"]["device"],
        "tvm_target": m["target"]["tvm_target"],
        "build_s": round(build_s, 2),
        "compile_s": _stage(progress.timings, "compiling for"),
        "link_s": _stage(progress.timings, "linking"),
        "kernel_compile_s": comp.get("seconds"),
        "code_bytes": m["files"]["model.so"]["bytes"],
        "elf_arch": elf_arch(out / "model.so"),
        "kernel_source_bytes": k.get("bytes"),
        "kernels": k.get("kernels"),
        "kernel_binary_bytes": comp.get("output_bytes"),
        "kernels_compiled_here": k.get("compiled"),
        "kernel_compiler": comp.get("compiler") or comp.get("skipped"),
        "verified": m["verification"]["ran"],
        "numerics_ok": numerics["ok"],
        "max_abs_error": max(o["max_abs"] for o in numerics["outputs"]),
    }


def _fmt_bytes(n: int | None) -> str:
    return "" if n is None else f"{n / 1024:,.0f} KiB" if n < 1 << 20 else f"{n / (1 << 20):,.2f} MiB"


def _report(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        f"# Targets × benchmark models, {doc['date']}", "",
        f"Machine: {m['cpu']}, {m['cores']} cores. Command: `{doc['command']}`. One run; each cell one "
        "`edgecomp.build` verified against ONNX Runtime on one reference sample (non-host targets: the same "
        "Relax module compiled for this host; GPU kernels compiled here by nvcc / clang, never executed). "
        "`model.so` of a GPU target holds its host code and the kernel source, which the device compiles when "
        "it loads it; `kernel binary` is what nvcc (cubin) or clang (SPIR bitcode) made of that source here.", "",
        "| model | target | ok | build s | tvm.compile s | kernels compiled s | model.so | ELF | kernel source | kernels | kernel binary | max abs err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        if not r["ok"]:
            lines.append(f"| {r['model']} | {r['target']} | **FAILED** | {r['build_s']} | {r['error']} | | | | | | | |")
            continue
        kc = r["kernel_compile_s"]
        lines.append(
            f"| {r['model']} | {r['target']} | ok | {r['build_s']} | {r['compile_s']} | "
            f"{'' if kc is None else kc} | {_fmt_bytes(r['code_bytes'])} | {r['elf_arch']} | "
            f"{_fmt_bytes(r['kernel_source_bytes'])} | {r['kernels'] or ''} | {_fmt_bytes(r['kernel_binary_bytes'])} | "
            f"{r['max_abs_error']:.1e} |"
        )
    ok = sum(r["ok"] for r in doc["results"])
    lines += ["", f"{ok} of {len(doc['results'])} cells built and verified."]
    compilers = sorted({r["kernel_compiler"] for r in doc["results"] if r.get("kernel_compiler")})
    if compilers:
        lines.append("Kernel compilers here: " + "; ".join(compilers) + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--targets", default="all", help="comma-separated target names (default: every registered target)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--report-only", metavar="JSON")
    args = ap.parse_args(argv)
    from edgecomp.bench.report import write_atomic
    from edgecomp.bench.runner import _machine

    if args.report_only:
        doc = json.loads(Path(args.report_only).read_text())
        write_atomic(Path(args.report_only).with_suffix(".md"), _report(doc))
        return 0
    import edgecomp
    from edgecomp.bench.models import fetch
    from edgecomp.targets import list_targets

    targets = [t.name for t in list_targets()] if args.targets == "all" else [t.strip() for t in args.targets.split(",")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    results = []
    with tempfile.TemporaryDirectory(prefix="edgecomp-bench-targets-") as work:
        # warm-up: TVM's first import and compile in this process would be charged to the first cell
        edgecomp.build(example="digits", target="host", output=Path(work) / "warm-up")
        for model in models:
            assets = fetch(model, quiet=True)
            names = [i["name"] for i in assets.meta["inputs"]]
            ref = Path(work) / f"{model}-ref.npz"
            np.savez(ref, **{k: v[:1] for k, v in assets.arrays("eval").items() if k in names})
            for target in targets:
                print(f"bench_targets: {model} → {target} ...", file=sys.stderr, flush=True)
                row = _cell(model, assets, target, ref, Path(work))
                print(f"  {'ok' if row['ok'] else 'FAILED: ' + row['error']} ({row['build_s']} s)", file=sys.stderr, flush=True)
                results.append(row)
                shutil.rmtree(Path(work) / f"{model}-{target}", ignore_errors=True)
    date = datetime.date.today().isoformat()
    doc = {"date": date, "command": " ".join(["python tools/bench_targets.py", *(argv if argv is not None else sys.argv[1:])]),
           "machine": _machine(), "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"targets-{date}.json", json.dumps(doc, indent=2) + "\n")
    write_atomic(out / f"targets-{date}.md", _report(doc))
    print(_report(doc))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
