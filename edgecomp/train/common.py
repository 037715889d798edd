"""What every training loop here shares: torch check, seeding, a per-epoch log with a progress line,
and single-process / ``torchrun`` (DDP) operation with the same code.

Scale-out: :func:`fit` runs single-process by default. Started under ``torchrun --nproc-per-node N``
(the environment has ``WORLD_SIZE``/``RANK``), it joins the process group (gloo on CPU, nccl when
each rank has a GPU), wraps the model in ``DistributedDataParallel``, gives each rank a disjoint
shard of every epoch's shuffled batch order, averages the logged loss over ranks, and only rank 0
prints and writes logs. The caller's code does not change.
"""

from __future__ import annotations

import json
import math
import atexit
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgecomp.errors import InputError

__all__ = ["require_torch", "seed_everything", "dist_info", "DistInfo", "TrainLog", "fit", "batches", "epoch_values"]


def require_torch() -> Any:
    """Import torch or raise a one-line error saying how to install the pinned CPU build."""
    try:
        import torch
    except ImportError:
        raise InputError("training needs PyTorch: pip install -e '.[train]' (pins torch==2.13.0, the CPU build)") from None
    return torch


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed torch and numpy; deterministic kernels so the same seed gives the same run."""
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def dist_info() -> DistInfo:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1); else single process."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        atexit.register(_leave_process_group)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _leave_process_group() -> None:
    """At exit of a process that joined the group here: wait for every rank, then leave.

    Meant to keep a rank that finishes first from closing its gloo connections while another
    still uses them. It does not cure every SIGABRT at exit: one was still seen afterwards
    ("terminate called without an active exception", after all epochs), and the torchrun test retries once.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def epoch_values(model: Any, loss: float, epoch: int, evaluate: Callable[[Any], dict[str, Any]] | None,
                 log: "TrainLog", hint: str = "") -> dict[str, Any]:
    """The end of an epoch: refuse a non-finite loss, then the epoch's record (loss + ``evaluate``
    on the model in eval mode)."""
    import torch

    if not math.isfinite(loss):
        raise InputError(f"{log.name}: loss is {loss} at epoch {epoch}{hint}")
    model.eval()
    values: dict[str, Any] = {"loss": loss}
    if evaluate is not None:
        with torch.no_grad():
            values.update(evaluate(model))
    return values


def batches(n: int, batch_size: int, generator: Any, info: DistInfo | None = None) -> list[Any]:
    """Shuffled index batches for one epoch; under DDP each rank takes every world-th batch
    (same permutation on every rank: the generator is seeded identically). All ranks get the same
    number of batches so the gradient all-reduces pair up."""
    import torch

    order = torch.randperm(n, generator=generator).split(batch_size)
    if info is None or not info.distributed:
        return list(order)
    usable = len(order) - len(order) % info.world
    return list(order[info.rank:usable:info.world])


@dataclass
class TrainLog:
    """Per-epoch log: one line per epoch on stderr (loss, metric, effective ranks, time) and, if
    ``path`` is given, one JSON object per epoch written to it (the file is started afresh at the
    first epoch). Within an epoch a progress line (step i/n, running loss) goes through
    :class:`edgecomp.progress.Progress`. ``enabled`` gates the stderr lines only; under DDP
    :func:`fit` silences ranks > 0 entirely (``main = False``: no lines, no file)."""

    name: str = "train"
    path: Path | None = None
    enabled: bool = True
    records: list[dict[str, Any]] = field(default_factory=list)
    main: bool = True

    def __post_init__(self) -> None:
        from edgecomp.progress import Progress

        self.progress = Progress(enabled=self.enabled)
        self.path = None if self.path is None else Path(self.path)
        self._file_started = False

    def step(self, epoch: int, i: int, n: int, loss: float) -> None:
        if self.enabled and self.main:
            self.progress.update(f"{self.name} epoch {epoch} step {i}/{n} loss {loss:.4g}", every=30.0)

    def epoch(self, epoch: int, **values: Any) -> dict[str, Any]:
        rec = {"epoch": epoch, **values}
        self.records.append(rec)
        if not self.main:
            return rec
        if self.enabled:
            parts = []
            for k, v in values.items():
                if isinstance(v, float):
                    parts.append(f"{k} {v:.4g}")
                elif isinstance(v, dict):
                    parts.append(f"{k} " + ",".join(f"{float(x):.1f}" for x in v.values()))
                else:
                    parts.append(f"{k} {v}")
            self.progress.note(f"{self.name} epoch {epoch}: " + "  ".join(parts))
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a" if self._file_started else "w") as f:
                f.write(json.dumps(rec, default=float) + "\n")
            self._file_started = True
        return rec


def fit(
    model: Any,
    loss_fn: Callable[[Any, Any], Any],
    data: tuple[Any, ...],
    *,
    epochs: int,
    batch_size: int = 32,
    optimizer: Any = None,
    lr: float = 1e-3,
    seed: int = 0,
    regularizer: Callable[[Any], Any] | None = None,
    evaluate: Callable[[Any], dict[str, Any]] | None = None,
    after_step: Callable[[Any], None] | None = None,
    schedule: str | None = None,
    log: TrainLog | None = None,
) -> list[dict[str, Any]]:
    """Minibatch training: ``loss_fn(model, batch) + regularizer(model)`` over ``data`` (a tuple of
    tensors indexed together), Adam(``lr``) unless ``optimizer`` is given. ``evaluate(model)`` after
    every epoch returns the metrics to log (effective ranks, accuracy...); ``after_step(model)``
    runs after each optimizer step (masks, projections); ``schedule="cosine"`` anneals the learning
    rate to 0 over the epochs (per epoch). Returns the per-epoch records.

    Under ``torchrun`` the model is wrapped in DDP (see the module doc); ``loss_fn`` gets the
    wrapped model, ``regularizer``/``evaluate``/``after_step`` the plain one.
    """
    import torch

    info = dist_info()
    log = log or TrainLog(enabled=info.main)
    if not info.main:
        log.enabled = log.main = False
    net = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    if schedule not in (None, "cosine"):
        raise InputError(f"unknown learning-rate schedule {schedule!r} (known: cosine)")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs) if schedule == "cosine" else None
    gen = torch.Generator().manual_seed(seed)
    n = len(data[0])
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        total, count = 0.0, 0
        order = batches(n, batch_size, gen, info)
        for i, idx in enumerate(order, 1):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net, tuple(t[idx] for t in data))
            if regularizer is not None:
                loss = loss + regularizer(model)
            loss.backward()
            opt.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step(model)
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            log.step(epoch, i, len(order), total / count)
        if sched is not None:
            sched.step()
        mean = total / max(count, 1)
        if info.distributed:
            import torch.distributed as dist

            t = torch.tensor([mean], dtype=torch.float64)
            dist.all_reduce(t)
            mean = float(t) / info.world
        values = epoch_values(model, mean, epoch, evaluate, log, f" (learning rate {lr} too high?)")
        values["seconds"] = round(time.perf_counter() - t0, 3)
        log.epoch(epoch, **values)
    return log.records
