"""Benchmark edgecomp against ONNX Runtime on real models; writes bench/results/<date>-<host>.*

    python tools/bench.py                      # all models, all configurations
    python tools/bench.py --quick              # CI smoke: digits-cnn, few repetitions (< 3 min)
    python tools/bench.py --models minilm --configs ort-fp32,edgecomp-lowrank

Thin wrapper: the logic is in edgecomp.bench.runner.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="digits-cnn,mobilenetv2,minilm")
    p.add_argument("--configs", default="ort-fp32,ort-int8,edgecomp,edgecomp-lowrank")
    p.add_argument("--threads", type=int, default=1, help="threads for ORT and TVM (default 1)")
    p.add_argument("--reps", type=int, default=50, help="timed runs per configuration (default 50)")
    p.add_argument("--eval-limit", type=int, help="score on the first N evaluation samples only")
    p.add_argument("--quick", action="store_true", help="digits-cnn only, 20 reps: a CI smoke run")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="results folder")
    p.add_argument("--report-only", metavar="JSON", help="rewrite the Markdown and HTML of a results JSON, run nothing")
    args = p.parse_args()
    # TVM's thread pool reads this when it starts: set it before anything imports tvm.
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from edgecomp.bench.runner import markdown_table, run_benchmark, write_results
    from edgecomp.errors import EdgecompError

    if args.report_only:
        import json

        src = Path(args.report_only)
        doc = json.loads(src.read_text())
        write_results(doc, src.parent, src.stem)
        print(markdown_table(doc))
        return 0
    models = ["digits-cnn"] if args.quick else [m.strip() for m in args.models.split(",") if m.strip()]
    reps = 20 if args.quick else args.reps
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    try:
        doc = run_benchmark(models, configs, threads=args.threads, reps=reps, eval_limit=args.eval_limit,
                            progress=lambda s: print(s, file=sys.stderr, flush=True))
    except EdgecompError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 2
    doc["command"] = " ".join(["python", "tools/bench.py", *sys.argv[1:]])
    stem = f"{datetime.date.today().isoformat()}-{platform.node() or 'host'}" + ("-quick" if args.quick else "")
    paths = write_results(doc, Path(args.out), stem)
    print(markdown_table(doc))
    print("written: " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    failed = [r for r in doc["results"] if r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
