"""digits-cnn: compression-aware training, then int8 + zstd through ``edgecomp build`` (issue 9 target).

For each seed: the shipped digits-cnn (or, with --from-scratch, a seeded init) is trained with a
low-rank regularizer on its SVD-parametrised conv2 and fc1 (edgecomp.train.regularize), truncated
to a parameter budget, fine-tuned by distillation from the shipped fp32 model's logits (the
teacher), magnitude-pruned and fine-tuned again with the zeros held (the zeros then cost zstd
almost nothing), exported to ONNX and built with ``edgecomp build --int8 minmax --int8-activations none --entropy zstd`` (int8 weights,
zstd-coded). The bundle is then run on the whole 360-sample test split and compared with the
shipped fp32 model under ONNX Runtime. Size ratio = fp32 ONNX file bytes / the bundle's coded
weights file (``weights.coded``; the code, ``model.so``, is the same few hundred KB for any digits
model and is reported separately).

    python tools/train_digits_compressed.py                       # 5 seeds, ~5 min
    python tools/train_digits_compressed.py --seeds 1 --epochs 5  # smoke run

Writes bench/results/digits-compressed-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import edgecomp
from edgecomp.examples import get_example
from edgecomp.passes.quantize_int8 import parse_int8
from edgecomp.train.common import TrainLog
from edgecomp.train.compress_aware import Recipe, accuracy, as_tensors, export_onnx, train_compressed
from edgecomp.train.data import digits_model, load_digits_splits, trained_digits_model
from edgecomp.versions import cpu_model

REPO = Path(__file__).resolve().parents[1]
SKIP = ("0", "8")  # first conv and classifier stay dense


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--regularizer", default="erank")
    ap.add_argument("--strength", type=float, default=1.0)
    ap.add_argument("--budget", type=int, default=10000, help="params after truncation")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--finetune-epochs", type=int, default=40)
    ap.add_argument("--sparsity", type=float, default=0.5, help="magnitude pruning of the thin model's matrices")
    ap.add_argument("--prune-epochs", type=int, default=30)
    ap.add_argument("--from-scratch", action="store_true", help="start from a seeded init, not the shipped weights")
    ap.add_argument("--no-distill", action="store_true", help="fine-tune on labels instead of the teacher's logits")
    ap.add_argument("--int8-activations", default="none", choices=["none", "int8", "uint8"])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    ex = get_example("digits")
    onnx_bytes = ex.model_path.stat().st_size
    sp = load_digits_splits()
    train = as_tensors(*sp["train"])
    x_test, y_test = sp["test"]
    test = as_tensors(x_test, y_test)
    teacher = trained_digits_model()
    sess = ort.InferenceSession(str(ex.model_path), providers=["CPUExecutionProvider"])
    fp32_acc = float((sess.run(None, {"input": x_test})[0].argmax(1) == y_test).mean())
    int8 = dataclasses.replace(parse_int8("minmax"), activations=args.int8_activations)
    recipe = Recipe(kind=args.regularizer, strength=args.strength, epochs=args.epochs, budget=args.budget,
                    finetune_epochs=args.finetune_epochs, finetune_lr=3e-3, schedule="cosine", sparsity=args.sparsity,
                    prune_epochs=args.prune_epochs, prune_lr=1e-3, skip=SKIP)
    runs = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgecomp-digits-") as tmp:
        work = Path(tmp)
        np.savez(work / "calib.npz", input=sp["calib"][0][:, None])
        np.savez(work / "reference.npz", input=x_test[:32, None])
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            # the test split doubles as "validation" in the per-epoch log only; nothing is chosen on it
            start = digits_model() if args.from_scratch else trained_digits_model()
            thin, rec = train_compressed(start, train, test, recipe, seed=seed,
                                         teacher=None if args.no_distill else teacher, log=TrainLog(name=f"seed {seed}"))
            rec["torch_test_acc"] = accuracy(thin, *test)
            onnx_path = work / f"digits-{seed}.onnx"
            export_onnx(thin, torch.zeros(1, 1, 8, 8), onnx_path)
            t0 = time.perf_counter()
            result = edgecomp.build(onnx_path, target="host", output=work / f"bundle-{seed}",
                                    input_shapes={"input": (1, 1, 8, 8)}, int8=int8, entropy="zstd",
                                    calib=work / "calib.npz", reference_inputs=work / "reference.npz")
            rec["build_seconds"] = round(time.perf_counter() - t0, 1)
            bundle = Path(result.path)
            coded = (bundle / "weights.coded").stat().st_size
            logits = edgecomp.run_bundle(bundle, {"input": x_test[:, None]})["logits"][:, 0]
            rec.update(coded_bytes=coded, code_bytes=(bundle / "model.so").stat().st_size, ratio=onnx_bytes / coded,
                       bundle_test_acc=float((logits.argmax(1) == y_test).mean()),
                       onnx_bytes_compressed=onnx_path.stat().st_size)
            runs.append(rec)
            print(f"seed {seed}: {rec['params']} params, ranks {rec['ranks']}; torch test {rec['torch_test_acc']:.4f}, "
                  f"bundle test {rec['bundle_test_acc']:.4f}; weights.coded {coded} B = {rec['ratio']:.1f}x "
                  f"({time.perf_counter() - t_all:.0f} s)", file=sys.stderr, flush=True)
    date = _dt.date.today().isoformat()
    accs = [r["bundle_test_acc"] for r in runs]
    ratios = [r["ratio"] for r in runs]
    summary = {
        "fp32_onnx_bytes": onnx_bytes, "fp32_test_acc": fp32_acc,
        "bundle_test_acc": [statistics.fmean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0, min(accs), max(accs)],
        "ratio": [statistics.fmean(ratios), min(ratios), max(ratios)],
        "loss_points": 100 * (fp32_acc - statistics.fmean(accs)),
        "target_met": min(ratios) >= 20 and 100 * (fp32_acc - statistics.fmean(accs)) <= 0.5,
    }
    meta = {"date": date, "machine": f"{cpu_model()}, torch {torch.__version__}, 1 thread",
            "command": "python tools/" + Path(__file__).name + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
            "recipe": recipe.__dict__ | {"skip": list(SKIP)}, "distill": not args.no_distill, "from_scratch": args.from_scratch,
            "int8_activations": args.int8_activations, "wall_seconds": round(time.perf_counter() - t_all, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"digits-compressed-{date}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1,
                                                    default=float) + "\n")
    stem.with_suffix(".md").write_text(markdown(meta, summary, runs))
    print(f"wrote {stem}.{{json,md}}; target met: {summary['target_met']}", file=sys.stderr)
    return 0


def markdown(meta: dict, s: dict, runs: list[dict]) -> str:
    r = meta["recipe"]
    acc = s["bundle_test_acc"]
    lines = [
        f"# digits-cnn: compression-aware training → int8 + zstd bundle ({meta['date']})", "",
        f"Machine: {meta['machine']}. Command: `{meta['command']}` ({meta['wall_seconds']:.0f} s).", "",
        f"Recipe: from {'a seeded init' if meta['from_scratch'] else 'the shipped fp32 weights'}, `{r['kind']}` regularizer "
        f"λ={r['strength']:g} (+ orthogonality {r['ortho']:g}) on the SVD-parametrised conv2 and fc1 for {r['epochs']} "
        f"epochs (Adam 1e-3), truncation to {r['budget']} params, {r['finetune_epochs']} epochs of fine-tuning "
        f"{'by distillation from the fp32 model (MSE on logits)' if meta['distill'] else 'on labels'} (Adam "
        f"{r['finetune_lr']:g}, {r['schedule']}), magnitude pruning of {r['sparsity']:.0%} of every matrix with ≥ "
        f"{r['prune_min_size']} entries and {r['prune_epochs']} more epochs with the zeros held (Adam {r['prune_lr']:g}); "
        f"then `edgecomp build --int8 minmax --int8-activations {meta['int8_activations']} --entropy zstd`. "
        f"Accuracy: the built bundle on the 360-sample test split.", "",
        f"**Result**: bundle weights {s['fp32_onnx_bytes'] / s['ratio'][0]:,.0f} B on average = "
        f"**{s['ratio'][0]:.1f}×** smaller than the fp32 ONNX ({s['fp32_onnx_bytes']:,} B; min {s['ratio'][1]:.1f}×); "
        f"test accuracy **{100 * acc[0]:.2f} ± {100 * acc[1]:.2f}%** (min {100 * acc[2]:.2f}, max {100 * acc[3]:.2f}) "
        f"vs fp32 {100 * s['fp32_test_acc']:.2f}%: loss {s['loss_points']:.2f} points. "
        f"Target (≥ 20×, ≤ 0.5 point loss): {'met' if s['target_met'] else 'NOT met'}.", "",
        "| seed | params | zeros | ranks (conv2, fc1) | effective ranks after training | torch test acc | bundle test acc | weights.coded B | ratio | model.so B |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in runs:
        lines.append(f"| {x['seed']} | {x['params']:,} | {x.get('zeros', 0):,} | {', '.join(str(v) for v in x['ranks'].values())} | "
                     f"{', '.join(f'{v:.1f}' for v in x['erank'].values())} | {100 * x['torch_test_acc']:.2f} | "
                     f"{100 * x['bundle_test_acc']:.2f} | {x['coded_bytes']:,} | {x['ratio']:.1f}× | {x['code_bytes']:,} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
