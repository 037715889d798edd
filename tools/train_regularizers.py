"""Effective rank vs nuclear norm vs l1 / Hoyer as low-rank regularizers, at matched parameter counts.

The survey (Ou et al. 2024) reports that effective rank beats the l1 norm as a rank/sparsity
measure. This study trains digits-cnn with each regularizer (edgecomp.train.regularize), several
strengths and seeds, truncates every trained model to the same parameter budgets with the same
rule (greedy energy per parameter, ``ranks_for_budget``), fine-tunes the thin model a few epochs,
and compares test accuracy. The strength of each regularizer is chosen on a validation split carved
out of the training split (never on the test split); the table reports the test split.

    python tools/train_regularizers.py                 # full study: ~30 min on 1 core
    python tools/train_regularizers.py --seeds 1 --strengths 1 --epochs 5   # smoke run

Writes bench/results/regularizers-<date>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edgecomp.train.common import TrainLog
from edgecomp.train.compress_aware import Recipe, accuracy, as_tensors, train_regularized, truncate_and_finetune
from edgecomp.train.data import digits_model, load_digits_splits
from edgecomp.versions import cpu_model

REPO = Path(__file__).resolve().parents[1]
N_VAL = 200
SKIP = ("0", "8")  # first conv (160 params) and classifier (650) stay dense in every run


def splits() -> tuple[tuple, tuple, tuple]:
    sp = load_digits_splits()
    x, y = sp["train"]
    perm = np.random.default_rng(0).permutation(len(y))
    train = as_tensors(x[perm[N_VAL:]], y[perm[N_VAL:]])
    val = as_tensors(x[perm[:N_VAL]], y[perm[:N_VAL]])
    return train, val, as_tensors(*sp["test"])


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="none,nuclear,l1,hoyer,erank")
    ap.add_argument("--strengths", default="0.1,0.3,1,3", help="λ grid (each method's best is picked on validation)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budgets", default="3000,6000,10000", help="params of the truncated model")
    ap.add_argument("--select-budget", type=int, default=6000, help="budget whose validation accuracy picks λ")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--finetune-epochs", type=int, default=20)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--add-to", type=Path, metavar="JSON",
                    help="a previous result of this tool (same settings): its runs are kept and these added, e.g. to "
                         "extend the λ grid of some methods where the best λ was at its edge")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    methods = args.methods.split(",")
    strengths = [float(s) for s in args.strengths.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    if args.select_budget not in budgets:
        ap.error(f"--select-budget {args.select_budget} is not one of --budgets")
    train, val, test = splits()
    log = TrainLog(name="study")
    log.enabled = False  # per-epoch lines would be thousands; progress per run below
    runs: list[dict] = []
    commands, wall = [], 0.0
    if args.add_to is not None:
        old = json.loads(args.add_to.read_text())
        same = {k: old["meta"][k] for k in ("epochs", "finetune_epochs", "seeds", "budgets", "select_budget")}
        mine = {"epochs": args.epochs, "finetune_epochs": args.finetune_epochs, "seeds": args.seeds, "budgets": budgets,
                "select_budget": args.select_budget}
        if same != mine:
            ap.error(f"--add-to {args.add_to}: settings differ ({same} vs {mine})")
        runs, commands, wall = old["runs"], old["meta"]["commands"], old["meta"]["wall_seconds"]
        done = {(r["kind"], r["strength"]) for r in runs}
    else:
        done = set()
    t_all = time.perf_counter()
    grid = [(m, lam) for m in methods for lam in ([0.0] if m == "none" else strengths) if (m, lam) not in done]
    for i, (method, lam) in enumerate(grid, 1):
        for seed in range(args.seeds):
            recipe = Recipe(kind=method, strength=lam, epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                            finetune_lr=1e-3, skip=SKIP)
            torch.manual_seed(seed)
            model = digits_model()
            svd_model, rec = train_regularized(model, train, val, recipe, seed=seed, log=log)
            rec["test_acc_trained"] = accuracy(svd_model, *test)
            rec["budgets"] = {}
            for budget in budgets:
                thin, r2 = truncate_and_finetune(svd_model, train, val, recipe, budget=budget, seed=seed, log=log)
                r2["test_acc"] = accuracy(thin, *test)
                no_ft = truncate_and_finetune(svd_model, train, val, dataclasses.replace(recipe, finetune_epochs=0),
                                              budget=budget, seed=seed)[0]
                r2["test_acc_truncated"] = accuracy(no_ft, *test)
                rec["budgets"][str(budget)] = r2
            runs.append(rec)
            b = rec["budgets"][str(args.select_budget)]
            print(f"[{i}/{len(grid)}] {method} λ={lam:g} seed {seed}: trained val {rec['val_acc_trained']:.3f}; "
                  f"@{args.select_budget}: truncated val {b['val_acc_truncated']:.3f} → fine-tuned val {b['val_acc']:.3f} "
                  f"test {b['test_acc']:.3f} ({time.perf_counter() - t_all:.0f} s)", file=sys.stderr, flush=True)

    methods = list(dict.fromkeys(r["kind"] for r in runs))
    summary = summarize(runs, methods, budgets, args.select_budget)
    date = _dt.date.today().isoformat()
    meta = {"date": date, "machine": f"{cpu_model()}, {platform.python_version()}, torch {torch.__version__}, 1 thread",
            "commands": commands + ["python tools/" + Path(__file__).name + (" " + " ".join(argv or sys.argv[1:])).rstrip()],
            "epochs": args.epochs, "finetune_epochs": args.finetune_epochs, "seeds": args.seeds,
            "strengths": sorted({r["strength"] for r in runs if r["kind"] != "none"}),
            "budgets": budgets, "select_budget": args.select_budget, "skip": list(SKIP), "n_val": N_VAL,
            "wall_seconds": round(wall + time.perf_counter() - t_all, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"regularizers-{date}"
    (stem.with_suffix(".json")).write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1) + "\n")
    (stem.with_suffix(".md")).write_text(markdown(meta, summary, methods, budgets))
    figure(summary, methods, budgets, stem.with_suffix(".png"))
    print(f"wrote {stem}.{{json,md,png}}", file=sys.stderr)
    return 0


def summarize(runs: list[dict], methods: list[str], budgets: list[int], select: int) -> dict:
    out: dict = {}
    for method in methods:
        mine = [r for r in runs if r["kind"] == method]
        lams = sorted({r["strength"] for r in mine})
        # λ chosen on the validation split at the selection budget (mean over seeds)
        best = max(lams, key=lambda lam: statistics.fmean(
            r["budgets"][str(select)]["val_acc"] for r in mine if r["strength"] == lam))
        chosen = [r for r in mine if r["strength"] == best]
        row: dict = {"strength": best, "erank": {}, "trained": mean_std([r["test_acc_trained"] for r in chosen]),
                     "by_strength": {}, "budgets": {}}
        for name in chosen[0]["erank"]:
            row["erank"][name] = mean_std([r["erank"][name] for r in chosen])
        for budget in budgets:
            key = str(budget)
            row["budgets"][key] = {
                "params": mean_std([r["budgets"][key]["params"] for r in chosen]),
                "truncated": mean_std([r["budgets"][key]["test_acc_truncated"] for r in chosen]),
                "finetuned": mean_std([r["budgets"][key]["test_acc"] for r in chosen]),
                "ranks": [r["budgets"][key]["ranks"] for r in chosen],
            }
        for lam in lams:
            these = [r for r in mine if r["strength"] == lam]
            row["by_strength"][str(lam)] = {
                "val": mean_std([r["budgets"][str(select)]["val_acc"] for r in these]),
                "test": mean_std([r["budgets"][str(select)]["test_acc"] for r in these]),
                "test_truncated": mean_std([r["budgets"][str(select)]["test_acc_truncated"] for r in these]),
            }
        out[method] = row
    return out


def _pm(ms: tuple[float, float], scale: float = 100.0) -> str:
    return f"{ms[0] * scale:.2f} ± {ms[1] * scale:.2f}"


def markdown(meta: dict, summary: dict, methods: list[str], budgets: list[int]) -> str:
    lines = [
        f"# Low-rank regularizers at matched parameter counts (digits-cnn, {meta['date']})", "",
        f"Machine: {meta['machine']}. Commands: {'; then '.join(f'`{c}`' for c in meta['commands'])} "
        f"({meta['wall_seconds']:.0f} s in all).", "",
        f"Each run: digits-cnn from a seeded init, {meta['epochs']} epochs of Adam (lr 1e-3, batch 32) with the regularizer "
        f"on the SVD-parametrised conv2 and fc1 (first conv and classifier dense; `nuclear` acts on the dense weights, "
        f"the others on U·diag(s)·Vᵀ with an orthogonality term), then truncation to each budget by the same greedy "
        f"energy-per-parameter rule, then {meta['finetune_epochs']} epochs of plain fine-tuning (lr 1e-3). "
        f"λ per regularizer picked from the strengths run for it (table below) by mean validation accuracy ({meta['n_val']} samples held out of "
        f"the training split) at {meta['select_budget']} params; accuracies below are on the 360-sample test split, "
        f"mean ± std over {meta['seeds']} seeds (percent). The dense digits-cnn has 38,282 params.", "",
    ]
    head = "| regularizer | λ | trained (full) | " + " | ".join(
        f"{b} params: truncated | {b}: fine-tuned" for b in budgets) + " | effective ranks (conv2, fc1) |"
    lines += [head, "|" + "---|" * (3 + 2 * len(budgets) + 1)]
    for method in methods:
        row = summary[method]
        cells = [method, f"{row['strength']:g}", _pm(row["trained"])]
        for b in budgets:
            cells += [_pm(row["budgets"][str(b)]["truncated"]), _pm(row["budgets"][str(b)]["finetuned"])]
        cells.append(", ".join(f"{v[0]:.1f}" for v in row["erank"].values()))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Every strength, at {meta['select_budget']} params (validation / test fine-tuned / test truncated):", "",
              "| regularizer | λ | val | test | test, truncated only |", "|---|---|---|---|---|"]
    for method in methods:
        for lam, v in summary[method]["by_strength"].items():
            lines.append(f"| {method} | {float(lam):g} | {_pm(v['val'])} | {_pm(v['test'])} | {_pm(v['test_truncated'])} |")
    lines.append("")
    return "\n".join(lines)


def figure(summary: dict, methods: list[str], budgets: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, key, title in ((axes[0], "truncated", "truncated, no fine-tuning"), (axes[1], "finetuned", "after fine-tuning")):
        for method in methods:
            ys = [summary[method]["budgets"][str(b)][key] for b in budgets]
            ax.errorbar(budgets, [100 * m for m, _ in ys], yerr=[100 * s for _, s in ys], marker="o", capsize=3,
                        label=f"{method} (λ={summary[method]['strength']:g})")
        ax.set_xlabel("parameters after truncation")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("digits-cnn: low-rank regularizers at matched parameter counts")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
