"""Compression-aware training of a classifier, end to end: SVD-parametrise → train with a low-rank
regularizer → truncate to a parameter budget → fine-tune the thin model → export to ONNX.

This is the recipe the regularizer study (``tools/train_regularizers.py``) runs for every
regularizer and seed, and that ``tools/train_digits_compressed.py`` feeds into ``edgecomp build
--int8 --entropy zstd``. Truncation uses the same rule for every regularizer
(:func:`edgecomp.train.regularize.ranks_for_budget`), so a comparison at one budget compares what
the regularizers did to the spectra, nothing else.
"""

from __future__ import annotations

import copy
import io
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgecomp.errors import InputError
from edgecomp.train.common import TrainLog, fit, seed_everything
from edgecomp.train.regularize import Regularizer, count_params, ranks_for_budget, summary, svd_parametrize, truncate

__all__ = ["Recipe", "accuracy", "train_regularized", "truncate_and_finetune", "train_compressed", "export_onnx", "as_tensors",
           "magnitude_masks", "apply_masks"]


@dataclass
class Recipe:
    """What one compression-aware run does (defaults: the digits-cnn study's)."""

    kind: str = "erank"           #: regularizer (edgecomp.train.regularize.REGULARIZERS)
    strength: float = 0.01        #: λ of the penalty
    ortho: float = 1.0            #: weight of the orthogonality term (SVD-parametrised kinds)
    epochs: int = 30              #: regularized training
    budget: int = 6000            #: params of the truncated model
    finetune_epochs: int = 10     #: plain training of the thin model
    lr: float = 1e-3
    finetune_lr: float = 5e-4
    schedule: str | None = None   #: fine-tuning learning-rate schedule (None or "cosine")
    sparsity: float = 0.0         #: magnitude pruning of the thin model's weight matrices, then...
    prune_epochs: int = 30        #: ...fine-tuning with the pruned weights held at zero
    prune_lr: float = 1e-3
    prune_min_size: int = 200     #: matrices smaller than this are not pruned
    batch_size: int = 32
    skip: tuple[str, ...] = field(default_factory=tuple)  #: layer names left dense


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _ce(net: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return nn.functional.cross_entropy(net(batch[0]), batch[1])


def train_regularized(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    recipe: Recipe,
    *,
    seed: int = 0,
    log: TrainLog | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Phase 1: train ``model`` (left untouched: a copy is trained) with the recipe's regularizer.
    Returns the trained model in SVD-parametrised form (ready for :func:`truncate_and_finetune`)
    and a record: effective ranks and validation accuracy at the end, seconds."""
    seed_everything(seed)
    log = log or TrainLog(name=recipe.kind, enabled=False)
    reg = Regularizer(recipe.kind, recipe.strength, recipe.ortho, skip=recipe.skip)
    # nuclear / dense erank act on the plain layers; the others on the SVD-parametrised ones
    net = copy.deepcopy(model) if reg.parametrisation == "dense" else svd_parametrize(model, skip=recipe.skip)
    t0 = time.perf_counter()
    fit(net, _ce, train, epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr, seed=seed, regularizer=reg,
        evaluate=lambda m: {"val_acc": accuracy(m, *val), "erank": summary(m)}, log=log)
    seconds = time.perf_counter() - t0
    if reg.parametrisation == "dense":  # the trained dense layers, in SVD form for truncation
        net = svd_parametrize(net, skip=recipe.skip)
    record = {"kind": recipe.kind, "strength": recipe.strength, "seed": seed, "erank": summary(net),
              "val_acc_trained": accuracy(net, *val), "params_dense": count_params(model), "seconds_train": round(seconds, 2)}
    return net, record


def truncate_and_finetune(
    svd_model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    recipe: Recipe,
    *,
    budget: int | None = None,
    seed: int = 0,
    teacher: nn.Module | None = None,
    log: TrainLog | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Phase 2: truncate to ``budget`` params (default ``recipe.budget``; ranks by
    :func:`ranks_for_budget`) and fine-tune the thin model without regularizer — on the labels, or
    on ``teacher``'s logits (distillation: MSE on logits) when one is given."""
    budget = recipe.budget if budget is None else budget
    ranks = ranks_for_budget(svd_model, budget)
    thin = truncate(svd_model, ranks)
    record: dict[str, Any] = {"budget": budget, "ranks": ranks, "params": count_params(thin),
                              "val_acc_truncated": accuracy(thin, *val)}
    t0 = time.perf_counter()
    data, loss = train, _ce
    if teacher is not None:
        with torch.no_grad():
            data = (train[0], teacher(train[0]))
        loss = _mse
    log = log or TrainLog(enabled=False)
    if recipe.finetune_epochs:
        seed_everything(seed + 1)
        log.name = f"{recipe.kind} fine-tune ({budget} params)"
        fit(thin, loss, data, epochs=recipe.finetune_epochs, batch_size=recipe.batch_size, lr=recipe.finetune_lr,
            seed=seed + 1, schedule=recipe.schedule, evaluate=lambda m: {"val_acc": accuracy(m, *val)}, log=log)
    record["val_acc_finetuned"] = accuracy(thin, *val)
    if recipe.sparsity > 0:
        masks = magnitude_masks(thin, recipe.sparsity, recipe.prune_min_size)
        record["val_acc_pruned"] = accuracy(thin, *val)
        seed_everything(seed + 2)
        log.name = f"{recipe.kind} pruned {recipe.sparsity:.0%} fine-tune"
        fit(thin, loss, data, epochs=recipe.prune_epochs, batch_size=recipe.batch_size, lr=recipe.prune_lr, seed=seed + 2,
            schedule=recipe.schedule, after_step=lambda m: apply_masks(masks),
            evaluate=lambda m: {"val_acc": accuracy(m, *val)}, log=log)
        record["zeros"] = sum(int((p == 0).sum()) for p, _ in masks)
    record.update(val_acc=accuracy(thin, *val), seconds_finetune=round(time.perf_counter() - t0, 2))
    return thin, record


def magnitude_masks(model: nn.Module, sparsity: float, min_size: int = 200) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zero the ``sparsity`` fraction of smallest-magnitude entries of every weight matrix (ndim ≥ 2,
    at least ``min_size`` entries; biases never) in place, per layer; returns (param, mask) pairs
    for :func:`apply_masks` to keep them at zero while fine-tuning."""
    if not 0 <= sparsity < 1:
        raise InputError(f"sparsity must be in [0, 1), got {sparsity}")
    masks = []
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and p.numel() >= min_size:
                k = int(p.numel() * sparsity)
                if k == 0:
                    continue
                threshold = p.abs().flatten().kthvalue(k).values
                mask = (p.abs() > threshold).to(p.dtype)
                p.mul_(mask)
                masks.append((p, mask))
    return masks


def apply_masks(masks: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for p, mask in masks:
        p.mul_(mask)


def _mse(net: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return nn.functional.mse_loss(net(batch[0]), batch[1])


def train_compressed(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    recipe: Recipe,
    *,
    seed: int = 0,
    teacher: nn.Module | None = None,
    log: TrainLog | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Both phases: returns the thin model and the merged record."""
    svd_model, record = train_regularized(model, train, val, recipe, seed=seed, log=log)
    thin, rec2 = truncate_and_finetune(svd_model, train, val, recipe, seed=seed, teacher=teacher, log=log)
    return thin, {**record, **rec2}


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, *, input_name: str = "input",
                output_name: str = "logits", opset: int = 17) -> None:
    """Export with a dynamic batch (the classic TorchScript exporter), written atomically."""
    import onnx

    buf = io.BytesIO()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=opset, input_names=[input_name],
                          output_names=[output_name], dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    onnx.checker.check_model(str(tmp), full_check=True)
    tmp.replace(path)


def as_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
