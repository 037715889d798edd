"""Accuracy recovery without labels: distil a compressed ONNX model from the original's outputs.

``finetune(compressed, teacher, data, epochs=...)``: the teacher (the original model) runs once in
ONNX Runtime over the unlabelled inputs; the compressed model, turned into torch by
:mod:`edgecomp.train.onnx_torch`, learns to reproduce those outputs; its trained weights go back
into its own graph, which is written atomically and scored again with ONNX Runtime.

Loss (``loss="auto"``, the default, chosen per output by measurement): KL(softmax(teacher/T) ‖
softmax(student/T))·T² with T = 4 on logits, MSE on every other output. Measured on digits-cnn
factorized at ``ratio:0.1`` (7.4× fewer parameters; bench/results/distill-2026-11-27.md: 20 epochs
on the 256 calibration images, accuracy on the 360 test images): 0.7472 → 0.9528 with KL at T = 4,
→ 0.9389 with MSE on logits (a one-off sweep of lr 1e-3/3e-3 also put KL at T = 1 at 0.9389, below
T = 4, and the same order at rank 2). Embeddings (MiniLM: unit vectors) have no softmax; MSE on unit vectors is
2 − 2·cos, the cosine they are scored by. An output counts as logits when it is classifier-like
([1, C] per sample, C > 1) and its teacher rows are neither unit vectors nor probability
distributions. ``loss="mse"`` / ``loss="kl"`` force one kind (``kl`` still uses MSE on outputs
that are not logits).

What trains (``train=``): ``all`` float weights, or only those ``changed`` by compression (they
differ from the teacher's initializer of the same name: low-rank factors, pruned tensors). On MiniLM
(834 sentences) training all weights moved held-out cosine down, training the changed ones moved it
up (pilot in the results file).

Data: ``.npz`` (or dict) with one array per model input, stacked along a leading sample axis
(the format of ``edgecomp build --reference-inputs``); other keys are ignored, except ``label`` in
the evaluation set, which adds accuracy to the per-epoch metrics.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper

from edgecomp.errors import InputError
from edgecomp.importer import TensorSpec, graph_inputs, graph_outputs, load_onnx
from edgecomp.numerics import _is_classifier, ort_session
from edgecomp.reference import coerce_dtype, load_npz, samples_from_arrays
from edgecomp.train.common import TrainLog, dist_info, fit, require_torch, seed_everything

torch = require_torch()

from edgecomp.train.onnx_torch import Batched, OnnxModule, to_onnx  # noqa: E402  (after the torch check)

__all__ = ["FinetuneResult", "finetune", "LOSSES", "load_rows", "metrics", "is_logits", "check_output"]

LOSSES = ("auto", "mse", "kl")


@dataclasses.dataclass
class FinetuneResult:
    """What ``finetune`` did: per-epoch records, metrics before and after (ORT), where it wrote."""

    output: Path | None
    epochs: list[dict[str, Any]]
    before: dict[str, float]
    after: dict[str, float]
    loss: str
    losses: dict[str, str]  # output name -> "kl" | "mse", what ``loss`` resolved to
    temperature: float
    settings: dict[str, Any]
    train_loss_before: float
    train_loss_after: float
    params: int
    pruned_weights: int
    seconds: float
    model: onnx.ModelProto = dataclasses.field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()
                if k != "model"}


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def _model(m: onnx.ModelProto | str | os.PathLike, role: str) -> tuple[onnx.ModelProto, str]:
    if isinstance(m, onnx.ModelProto):
        return m, f"{role} model"
    return load_onnx(m), str(m)


def load_rows(data: str | os.PathLike | dict[str, np.ndarray], specs: list[TensorSpec], role: str
              ) -> tuple[dict[str, np.ndarray], bool, dict[str, np.ndarray]]:
    """Model inputs as rows ([N, ...] per input name), whether they are per-sample stacks (of the
    graph's input shape: run one sample at a time, vmap in torch) or rows along the graph's dynamic
    leading axis (fed in batches as they are), and every array of the file."""
    if isinstance(data, dict):
        arrays, source = data, f"{role} arrays"
    else:
        arrays, source = load_npz(data), f"{role} file {data}"
    if all(s.is_static for s in specs):
        samples = samples_from_arrays(arrays, specs, source)
        return {s.name: np.stack([f[s.name] for f in samples]) for s in specs}, True, arrays
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise InputError(f"{source}: no array for input(s) {', '.join(missing)} (has: {', '.join(arrays) or 'none'})")
    if all(np.ndim(arrays[s.name]) == len(s.shape) + 1 for s in specs):
        # a stack of samples, each a whole (dynamic-size) batch: fix each sample's own shape
        fixed = [TensorSpec(s.name, tuple(np.shape(arrays[s.name])[1:]), s.dtype) for s in specs]
        samples = samples_from_arrays(arrays, fixed, source)
        return {s.name: np.stack([f[s.name] for f in samples]) for s in specs}, True, arrays
    rows, counts = {}, set()
    for s in specs:
        arr = np.asarray(arrays[s.name])
        if arr.ndim != len(s.shape) or any(isinstance(d, int) and d > 0 and d != n for d, n in zip(s.shape[1:], arr.shape[1:])):
            raise InputError(f"{source}: input {s.name!r} has shape {list(arr.shape)}; the model wants {list(s.shape)} "
                             f"(rows along its dynamic leading axis)")
        rows[s.name] = coerce_dtype(arr, s.dtype, source, s.name)
        counts.add(len(arr))
    if len(counts) != 1 or 0 in counts:
        raise InputError(f"{source}: inputs hold different numbers of rows, or none: {sorted(counts)}")
    return rows, False, arrays


def _ort_outputs(model: onnx.ModelProto, rows: dict[str, np.ndarray], per_sample: bool, names: list[str],
                 threads: int, chunk: int = 64) -> list[np.ndarray]:
    """ONNX Runtime outputs for every row: one array per output, stacked like the inputs."""
    sess = ort_session(model, threads=threads)
    n = len(next(iter(rows.values())))
    outs: list[list[np.ndarray]] = [[] for _ in names]
    step = 1 if per_sample else chunk
    for i in range(0, n, step):
        feed = {k: (v[i] if per_sample else v[i:i + step]) for k, v in rows.items()}
        try:
            res = sess.run(names, feed)
        except Exception as err:
            raise InputError(f"ONNX Runtime failed on the data: {str(err).strip().splitlines()[0][:300]}") from None
        for j, r in enumerate(res):
            outs[j].append(r)
    return [np.stack(o) if per_sample else np.concatenate(o) for o in outs]


# ----------------------------------------------------------------------------------------------
# Loss and metrics
# ----------------------------------------------------------------------------------------------


def is_logits(teacher: np.ndarray, classifier: bool) -> bool:
    """Classifier-like teacher outputs ([K, 1, C] or [N, C]) that are neither unit vectors
    (embeddings) nor probability rows (a softmax already applied)."""
    if not classifier:
        return False
    rows = teacher.reshape(-1, teacher.shape[-1]).astype(np.float64)
    unit = np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-3)
    probs = bool(np.all(rows >= 0)) and np.allclose(rows.sum(1), 1.0, atol=1e-3)
    return not (unit or probs)


def _loss_fn(kinds: list[str], temperature: float) -> Callable:
    F = torch.nn.functional

    def loss(student: tuple, teacher: tuple):
        total = 0.0
        for s, t, kind in zip(student, teacher, kinds):
            if kind == "kl":
                T = temperature
                total = total + F.kl_div(F.log_softmax(s / T, -1).reshape(-1, s.shape[-1]),
                                         F.log_softmax(t / T, -1).reshape(-1, t.shape[-1]),
                                         reduction="batchmean", log_target=True) * T * T
            else:
                total = total + F.mse_loss(s, t)
        return total

    return loss


def metrics(student: np.ndarray, teacher: np.ndarray, labels: np.ndarray | None, logits: bool) -> dict[str, float]:
    """First output vs the teacher's, per sample: mean/min cosine; for logits also top-1 agreement
    and accuracy (when labels are given)."""
    a = student.reshape(len(student), -1).astype(np.float64)
    b = teacher.reshape(len(teacher), -1).astype(np.float64)
    cos = np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    out = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
    if logits:
        ps, pt = student.argmax(-1).reshape(-1), teacher.argmax(-1).reshape(-1)
        out["top1_agreement"] = float(np.mean(ps == pt))
        if labels is not None:
            out["accuracy"] = float(np.mean(ps == np.asarray(labels).reshape(-1)))
    return out


def _torch_outputs(model: Batched, rows: dict[str, np.ndarray], names: list[str], batch: int) -> list[np.ndarray]:
    n = len(next(iter(rows.values())))
    outs: list[list[np.ndarray]] = []
    was = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, n, batch):
            res = model(*[torch.from_numpy(rows[k][i:i + batch]) for k in names])
            if not outs:
                outs = [[] for _ in res]
            for j, r in enumerate(res):
                outs[j].append(r.numpy())
    model.train(was)
    return [np.concatenate(o) for o in outs]


# ----------------------------------------------------------------------------------------------
# The call
# ----------------------------------------------------------------------------------------------


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output(output: str | os.PathLike | None, inputs: list[Any]) -> Path | None:
    """The output path, refused when it is one of the input files or a directory."""
    if output is None:
        return None
    out = Path(output)
    for x in inputs:
        if isinstance(x, (str, os.PathLike)) and _same_file(out, Path(x)):
            raise InputError(f"output {out} is one of the inputs ({x}); give another -o (inputs are never overwritten)")
    if out.is_dir():
        raise InputError(f"output {out} is a directory; give an .onnx file path")
    if not out.parent.exists():
        raise InputError(f"output folder {out.parent} does not exist")
    return out


def finetune(
    compressed: onnx.ModelProto | str | os.PathLike,
    teacher: onnx.ModelProto | str | os.PathLike,
    data: str | os.PathLike | dict[str, np.ndarray],
    *,
    epochs: int,
    lr: float = 1e-4,
    batch_size: int = 32,
    seed: int = 0,
    eval_data: str | os.PathLike | dict[str, np.ndarray] | None = None,
    log: str | os.PathLike | TrainLog | None = None,
    output: str | os.PathLike | None = None,
    loss: str = "auto",
    temperature: float = 4.0,
    threads: int | None = None,
    train: str = "all",
    loss_samples: int | None = None,
    quiet: bool = False,
    schedule: str | None = None,
) -> FinetuneResult:
    """Distil ``compressed`` from ``teacher`` on the unlabelled inputs of ``data``.

    Args:
        compressed: the model to train (file or proto): float ONNX (low-rank, pruned, ...).
        teacher: the original model (same input and output names); run once in ONNX Runtime.
        data: ``.npz`` or dict, one array per input name (a stack of samples).
        epochs, lr, batch_size, seed: Adam(``lr``) over shuffled batches, ``epochs`` passes.
        eval_data: held-out inputs (``label`` optional): the metric after every epoch (torch) and
            before/after training (ONNX Runtime on the graphs themselves).
        log: JSONL path (one object per epoch) or a :class:`TrainLog`.
        output: write the trained ONNX here (atomically; never over an input).
        loss: ``auto`` (default: KL at ``temperature`` on logits, MSE on other outputs), ``mse``
            (every output) or ``kl`` (KL on classifier-like outputs, MSE on the rest).
        threads: torch and ONNX Runtime threads (default: torch's current setting).
        train: ``all`` (every float weight) or ``changed`` (only the weights that differ from the
            teacher's initializer of the same name: low-rank factors, pruned tensors).
        loss_samples: measure the distillation loss before and after training on the first
            ``loss_samples`` training samples only (default: all; a full pass costs a forward each).
        schedule: learning-rate schedule: ``None`` (constant ``lr``, the default) or ``"cosine"``
            (annealed per epoch, ``lr`` in the first epoch towards 0 after the last).
    Returns:
        :class:`FinetuneResult`; ``.model`` is the trained ONNX model.
    """
    t_start = time.perf_counter()
    if train not in ("all", "changed"):
        raise InputError(f"unknown train setting {train!r} (all, changed)")
    if loss not in LOSSES:
        raise InputError(f"unknown loss {loss!r} (known: {', '.join(LOSSES)})")
    if schedule not in (None, "cosine"):
        raise InputError(f"unknown learning-rate schedule {schedule!r} (known: cosine)")
    if epochs < 0 or batch_size < 1 or not lr > 0 or not temperature > 0:
        raise InputError("epochs must be >= 0, batch size >= 1, learning rate and temperature > 0")
    out_path = check_output(output, [compressed, teacher, data, eval_data])
    student_proto, s_where = _model(compressed, "compressed")
    teacher_proto, t_where = _model(teacher, "teacher")
    in_specs = graph_inputs(student_proto)
    names = [s.name for s in in_specs]
    out_names = [o.name for o in graph_outputs(student_proto)]
    t_in, t_out = [s.name for s in graph_inputs(teacher_proto)], [o.name for o in graph_outputs(teacher_proto)]
    if sorted(t_in) != sorted(names) or t_out != out_names:
        raise InputError(f"{t_where} and {s_where} differ in their inputs/outputs: teacher {t_in} → {t_out}, "
                         f"compressed {names} → {out_names}")
    inner = OnnxModule(student_proto, where=s_where)
    if train == "changed":  # only the weights compression changed (factors, pruned tensors): the rest stays
        originals = {t.name: t for t in teacher_proto.graph.initializer}
        for name, w in zip(inner.names, inner.weights):
            t = originals.get(name)
            if t is not None and tuple(t.dims) == tuple(w.shape) and np.array_equal(numpy_helper.to_array(t), w.detach().numpy()):
                w.requires_grad_(False)
        if not any(w.requires_grad for w in inner.weights):
            raise InputError(f"{s_where}: no weight differs from the teacher's: nothing to train with --train changed")
    threads = threads or torch.get_num_threads()
    seed_everything(seed)
    tlog = log if isinstance(log, TrainLog) else TrainLog(name="distill", path=log)
    if quiet:  # no lines on stderr; the JSONL file is still written (TrainLog.enabled gates both)
        tlog.progress.enabled = False

    rows, per_sample, _ = load_rows(data, in_specs, "data")
    t0 = time.perf_counter()
    tlog.progress.note(f"teacher outputs (ONNX Runtime) on {len(rows[names[0]])} training samples")
    targets = _ort_outputs(teacher_proto, rows, per_sample, out_names, threads)
    teacher_s = time.perf_counter() - t0
    sample_out = [t[0] for t in targets]
    classifier = [_is_classifier(o if per_sample else o[None]) for o in sample_out]
    # top-1 agreement / accuracy are reported for logits only (not for embeddings or probabilities)
    scored_logits = is_logits(targets[0], classifier[0])
    ev = None
    before: dict[str, float] = {}
    if eval_data is not None:
        e_rows, e_per, e_arrays = load_rows(eval_data, in_specs, "eval")
        labels = e_arrays.get("label")
        e_teacher = _ort_outputs(teacher_proto, e_rows, e_per, out_names, threads)[0]
        before = metrics(_ort_outputs(student_proto, e_rows, e_per, out_names, threads)[0], e_teacher, labels,
                         scored_logits)
        ev = (e_rows, e_teacher, labels)
        tlog.progress.note("before: " + ", ".join(f"{k} {v:.4f}" for k, v in before.items()))

    model = Batched(inner, per_sample)
    kinds = ["mse" if loss == "mse" else
             "kl" if (loss == "kl" and c) or (loss == "auto" and is_logits(t, c)) else "mse"
             for t, c in zip(targets, classifier)]
    loss_of = _loss_fn(kinds, temperature)
    x = [torch.from_numpy(np.ascontiguousarray(rows[n])) for n in names]
    y = [torch.from_numpy(np.ascontiguousarray(t)) for t in targets]
    k = len(x)

    def train_loss(net, batch):
        return loss_of(net(*batch[:k]), batch[k:])

    def full_loss() -> float:
        total, n = 0.0, min(len(x[0]), loss_samples or len(x[0]))
        with torch.no_grad():
            for i in range(0, n, batch_size):
                sl = slice(i, i + batch_size)
                total += float(loss_of(model(*[t[sl] for t in x]), [t[sl] for t in y])) * len(x[0][sl])
        return total / max(n, 1)

    def evaluate(m) -> dict[str, Any]:
        if ev is None:
            return {}
        got = _torch_outputs(m, ev[0], names, batch_size)[0]
        return {f"eval_{k}": v for k, v in metrics(got, ev[1], ev[2], scored_logits).items()}

    model.eval()
    loss_before = full_loss()
    tlog.progress.note(f"loss per output: {', '.join(f'{n} {k}' for n, k in zip(out_names, kinds))}")
    tlog.progress.note(f"distillation loss before: {loss_before:.6g}; {sum(p.numel() for p in inner.parameters() if p.requires_grad):,} "
                       f"trainable values, {len(inner.masks)} pruned weight(s) masked")
    records = fit(model, train_loss, (*x, *y), epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                  evaluate=evaluate, after_step=lambda m: m.inner.apply_masks(), schedule=schedule, log=tlog)
    model.eval()
    loss_after = full_loss()
    # under torchrun every rank holds the same weights: rank 0 writes the file
    trained = to_onnx(inner, student_proto, out_path if dist_info().main else None)
    after: dict[str, float] = {}
    if ev is not None:
        after = metrics(_ort_outputs(trained, ev[0], e_per, out_names, threads)[0], ev[1], ev[2], scored_logits)
        tlog.progress.note("after (ONNX Runtime on the written model): " + ", ".join(f"{k} {v:.4f}" for k, v in after.items()))
    return FinetuneResult(
        output=out_path, epochs=records, before=before, after=after, loss=loss,
        losses=dict(zip(out_names, kinds)), temperature=temperature,
        settings={"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "samples": len(x[0]),
                  "eval_samples": 0 if ev is None else len(ev[1]), "per_sample_vmap": per_sample,
                  "threads": threads, "train": train, "schedule": schedule, "loss_samples": min(len(x[0]), loss_samples or len(x[0])), "teacher_seconds": round(teacher_s, 2)},
        train_loss_before=loss_before, train_loss_after=loss_after,
        params=sum(p.numel() for p in inner.parameters() if p.requires_grad), pruned_weights=len(inner.masks),
        seconds=round(time.perf_counter() - t_start, 2), model=trained,
    )
