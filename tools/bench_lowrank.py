"""Effective rank vs energy vs l1: which rank-selection rule keeps the most accuracy per parameter?

    python tools/bench_lowrank.py                    # all three benchmark models
    python tools/bench_lowrank.py --models digits-cnn --eval-limit 200

For each model, sweeps every policy family with and without data-aware SVD, scores each point on
the model's evaluation split with ONNX Runtime, and writes bench/results/lowrank-study-<date>.*
(JSON with every point, a Markdown table of the families at matched compression ratios, and one
PNG figure per model). Thin wrapper over edgecomp.bench.lowrank_study.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Which layers each model's study factorizes (embedding tables count for minilm).
LAYERS = {"digits-cnn": ("gemm", "conv"), "mobilenetv2": ("gemm", "conv"), "minilm": ("gemm", "embedding")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="digits-cnn,mobilenetv2,minilm")
    p.add_argument("--eval-limit", type=int, help="score on the first N evaluation samples only")
    p.add_argument("--calib-limit", type=int, default=128, help="calibration samples for data-aware SVD")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--report-only", action="store_true", help="rewrite the Markdown from the day's JSON, run nothing")
    args = p.parse_args()

    import dataclasses

    from edgecomp.bench import models as bench_models
    from edgecomp.bench.lowrank_study import StudyPoint, matched_table, run_study, study_figure
    from edgecomp.bench.report import day_document, write_atomic
    from edgecomp.figures import pyplot
    from edgecomp.importer import load_onnx

    out = Path(args.out)
    doc_path, stem, doc = day_document(out, "lowrank-study")
    for name in [] if args.report_only else [m.strip() for m in args.models.split(",") if m.strip()]:
        assets = bench_models.fetch(name)
        model = load_onnx(assets.onnx)
        eval_feeds = assets.feeds("eval")[: args.eval_limit]
        arrays = {k: v[: len(eval_feeds)] for k, v in assets.arrays("eval").items()}
        calib = assets.feeds("calib")[: args.calib_limit]
        headline = assets.meta["metric"]

        def score(outputs, name=name, arrays=arrays, headline=headline):
            import numpy as np

            stacked = np.stack([o[0] for o in outputs])
            return bench_models.evaluate(name, stacked, arrays)[headline]

        print(f"== {name}: {len(eval_feeds)} eval samples, {len(calib)} calib samples, metric {headline}", file=sys.stderr)
        points = run_study(model, eval_feeds, score, calib, layers=LAYERS[name],
                           progress=lambda s: print("  " + s, file=sys.stderr, flush=True))
        doc["models"][name] = {
            "command": " ".join(["python", "tools/bench_lowrank.py", *sys.argv[1:]]),
            "metric": headline,
            "eval_samples": len(eval_feeds),
            "calib_samples": len(calib),
            "layers": list(LAYERS[name]),
            "points": [dataclasses.asdict(p) for p in points],
            "matched": matched_table(points),
        }
        fig = study_figure(points, f"{name}: {headline} vs parameters kept", headline)
        fig.savefig(out / f"{stem}-{name}.png", dpi=110, bbox_inches="tight")
        pyplot().close(fig)
    md = ["Metric at matched parameter ratios (whole model), interpolated on each policy's curve (made "
          "monotone); `best` = the family with the highest metric (`tie`: top two within 1e-6).", ""]
    for name, entry in doc["models"].items():
        md += [f"### {name} ({entry['metric']}; {entry['eval_samples']} eval samples, layers {', '.join(entry['layers'])})",
               "", f"`{entry['command']}`", "",
               "| SVD | params kept | erank | energy | l1 | best |", "|---|---|---|---|---|---|"]
        entry["matched"] = matched_table([StudyPoint(**p) for p in entry["points"]])
        for row in entry["matched"]:
            cells = [f"{row[k]:.4f}" if row.get(k) is not None else "–" for k in ("erank", "energy", "l1")]
            md.append(f"| {'data-aware' if row['data_aware'] else 'plain'} | {row['params_ratio']:.3f} | {' | '.join(cells)} | {row['best']} |")
        md += ["", f"![{name}]({stem}-{name}.png)", ""]
    for suffix, text in ((".json", json.dumps(doc, indent=1) + "\n"), (".md", "\n".join(md) + "\n")):
        write_atomic(out / f"{stem}{suffix}", text)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
