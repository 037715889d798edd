"""Fetch the benchmark models (ONNX + evaluation/calibration data) into the local cache.

Why: benchmarks need real models and real inputs, rebuilt offline and identically on any
machine; the recipes live in ``edgecomp.bench.models`` (see its docstring), this is the thin
command line over them.

    python tools/models.py list
    python tools/models.py fetch NAME [NAME ...] [--cache DIR] [--force]

``fetch`` reuses a cached folder whose files still match its meta.json, installs missing pip
packages (never torch), and prints one summary line per model on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgecomp.bench.models import BENCH_MODELS, default_cache_dir, fetch
from edgecomp.errors import EdgecompError


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def cmd_list(args: argparse.Namespace) -> int:
    root = Path(args.cache) if args.cache else default_cache_dir()
    for name, model in BENCH_MODELS.items():
        meta_path = root / name / "meta.json"
        state = "not fetched"
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
                state = f"cached: eval {meta['splits']['eval']}, calib {meta['splits']['calib']} samples"
            except (ValueError, KeyError):
                state = "cache unreadable"
        print(f"{name:12s} metric={model.metric:15s} inputs={','.join(model.inputs):25s} {state}")
        print(f"{'':12s} {model.description}")
    print(f"cache: {root}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    for name in args.names:
        t0 = time.monotonic()
        assets = fetch(name, cache_dir=args.cache, force=args.force, quiet=args.quiet)
        m = assets.meta
        print(f"{name}: {assets.onnx} ({_size(assets.onnx)}), eval {m['splits']['eval']} samples "
              f"({_size(assets.eval)}), calib {m['splits']['calib']} samples ({_size(assets.calib)}), "
              f"metric {m['metric']}, {time.monotonic() - t0:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("list", help="the benchmark models and what is cached")
    p.add_argument("--cache", help=f"cache folder (default {default_cache_dir()})")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("fetch", help="build (or reuse) models in the cache")
    p.add_argument("names", nargs="+", metavar="NAME", choices=sorted(BENCH_MODELS))
    p.add_argument("--cache", help=f"cache folder; NAME goes in DIR/NAME (default {default_cache_dir()})")
    p.add_argument("-f", "--force", action="store_true", help="rebuild even if the cache is valid")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_fetch)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except EdgecompError as err:
        print(f"models: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
