"""Subspace training: DLDR + P-SGD / P-BFGS (Li, Luo, Yan, Wu, Huang and Suykens, "Low Dimensional
Trajectory Hypothesis is True: DNNs Can Be Trained in Tiny Subspaces", TPAMI 2022).

The paper's hypothesis: the optimisation trajectory of a network with ``n`` parameters lives, to a
good approximation, in an affine subspace of tiny dimension ``d`` (d = 40 for ResNets on CIFAR). If
so, that subspace can be found from a short stretch of ordinary training and the rest of training
can run in ``d`` coordinates, where second-order methods are cheap (a ``d×d`` quasi-Newton matrix).

Steps of the paper's DLDR procedure and its two subspace optimizers (P-SGD, P-BFGS), numbered here:

1. **Sample** ``t`` parameter vectors ``w_1..w_t`` along a short ordinary training run
   (:func:`sample_trajectory`; the paper samples after each epoch or more often, we sample at evenly
   spaced optimizer steps including the initial point).
2. **Centre** them, ``w̄ = mean w_i``, ``W = [w_1 − w̄, …, w_t − w̄]`` (n×t).
3. **PCA**: the top ``d`` left singular vectors of ``W`` give ``P`` (n×d, orthonormal columns)
   (:func:`dldr_subspace`; as in the paper, through the eigenvectors of the t×t Gram matrix ``WᵀW``
   because ``n ≫ t``).
4. **Train in the subspace**: parameters are ``w = w_a + P z`` with ``z ∈ R^d``; the full gradient
   ``g`` is projected, ``g_z = Pᵀ g`` (equivalently ``g_P = P Pᵀ g`` in parameter space), and
   - **P-SGD** (:func:`psgd`): SGD with momentum on ``z`` (the reference code: lr 1, momentum 0.9,
     lr × 0.1 at step milestones). Momentum on ``z`` equals momentum on ``P Pᵀ g`` because the
     projection is linear;
   - **P-BFGS** (:func:`pbfgs`): BFGS on ``z``: the inverse-Hessian estimate ``H`` (d×d, from the
     identity) gets the standard update from ``s = z_{k+1} − z_k`` and ``y = g_{z,k+1} − g_{z,k}``
     whenever ``yᵀs > 0`` (curvature condition), the direction is ``−H g_z`` and the step length
     comes from an Armijo backtracking line search on the same minibatch (reference constants:
     σ = 0.4, shrink ρ = 0.4, at most 20 trials).

We keep ``z`` and rebuild ``w = w_a + P z`` after every step (instead of adding ``P Δz`` to ``w``) so
the parameters stay inside ``w_a + span(P)`` to float rounding, with no drift from repeated
additions. ``w_a`` (the *anchor*) is where subspace training starts: the reference code restarts
from the first sampled point (the initialisation), continuing from the last one saves the epochs
already spent sampling; both are ``w_a``.

Scale-out: :func:`psgd` goes through :func:`edgecomp.train.common.fit` with a projecting optimizer,
so under ``torchrun`` DDP all-reduces the full gradient first and every rank projects the same
averaged gradient: the ``z`` updates are identical on all ranks without any extra communication.
:func:`pbfgs` runs single-process (its line search would need an all-reduce of every trial loss).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from edgecomp.errors import InputError
from edgecomp.train.common import TrainLog, batches, dist_info, epoch_values, fit

__all__ = [
    "Trajectory",
    "Subspace",
    "flat_params",
    "flat_grad",
    "sample_trajectory",
    "dldr_subspace",
    "ProjectedSGD",
    "psgd",
    "pbfgs",
]


def flat_params(model: nn.Module) -> torch.Tensor:
    """All trainable parameters as one detached vector (the order of ``model.parameters()``)."""
    return parameters_to_vector([p for p in model.parameters() if p.requires_grad]).detach().clone()


def flat_grad(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The gradients of ``params`` as one vector; a parameter without a gradient contributes zeros."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def _set_params(params: Sequence[torch.Tensor], vec: torch.Tensor) -> None:
    with torch.no_grad():
        vector_to_parameters(vec, list(params))


@dataclass
class Trajectory:
    """Sampled parameter vectors of a training run (DLDR step 1).

    ``weights`` [t, n] float32, row i taken after ``steps[i]`` optimizer steps (row 0 = the start);
    ``records`` the per-epoch log of the run; ``seconds`` its wall time (training + evaluation +
    snapshot copies), the cost the subspace method pays before it can start.
    """

    weights: torch.Tensor
    steps: list[int]
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def first(self) -> torch.Tensor:
        return self.weights[0]

    @property
    def last(self) -> torch.Tensor:
        return self.weights[-1]


class Subspace(NamedTuple):
    """Result of DLDR (steps 2–3): the snapshots' mean, an orthonormal basis ``P`` [n, d] of the top
    ``d`` principal directions, and the fraction of the trajectory's variance each direction
    explains (``explained[i] = σᵢ² / Σ σⱼ²``, like scikit-learn's ``explained_variance_ratio_``)."""

    mean: torch.Tensor
    P: torch.Tensor
    explained: torch.Tensor


def sample_trajectory(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Any],
    data: tuple[Any, ...],
    *,
    epochs: int,
    snapshots: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    optimizer: Any = None,
    seed: int = 0,
    evaluate: Callable[[Any], dict[str, Any]] | None = None,
    log: TrainLog | None = None,
) -> Trajectory:
    """DLDR step 1: train ``model`` ordinarily for ``epochs`` (:func:`fit`: Adam(``lr``) unless
    ``optimizer`` is given) and record ``snapshots`` parameter vectors at evenly spaced optimizer
    steps, the first before any step and the last after the final one.

    Why evenly in steps: the paper samples once per epoch over tens of epochs; a short run has only
    a few epochs, so we sample within epochs to get the ``t > d`` points that PCA to ``d``
    dimensions needs. The model is left at the end of the run.
    """
    if snapshots < 2:
        raise InputError(f"sample_trajectory: snapshots must be >= 2, got {snapshots}")
    info = dist_info()
    per_epoch = len(batches(len(data[0]), batch_size, torch.Generator().manual_seed(0), info))
    total = per_epoch * epochs
    if total < snapshots - 1:
        raise InputError(f"sample_trajectory: {snapshots} snapshots need at least {snapshots - 1} steps; "
                         f"{epochs} epochs give {total}")
    wanted = sorted({round(i * total / (snapshots - 1)) for i in range(snapshots)})
    want = set(wanted)
    taken: list[torch.Tensor] = []
    steps: list[int] = []
    counter = {"step": 0}

    def after_step(m: nn.Module) -> None:
        counter["step"] += 1
        if counter["step"] in want:
            taken.append(flat_params(m))
            steps.append(counter["step"])

    t0 = time.perf_counter()
    taken.append(flat_params(model))
    steps.append(0)
    records = fit(model, loss_fn, data, epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
                  seed=seed, evaluate=evaluate, after_step=after_step, log=log)
    seconds = time.perf_counter() - t0
    return Trajectory(torch.stack(taken), steps, records, seconds)


def dldr_subspace(snapshots: torch.Tensor | Trajectory, d: int) -> Subspace:
    """DLDR steps 2–3: centre the ``t`` snapshots and keep their top ``d`` principal directions.

    Computed in float64 as the paper does: eigen-decomposition of the small ``t×t`` Gram matrix of
    the centred snapshots, ``u_i`` → ``W u_i / ‖W u_i‖`` (the same vectors as a thin SVD of the
    ``t×n`` matrix, ~8x faster here for t = 61, n = 38k). Centred data have rank ≤ ``t − 1``, so
    ``d`` must not exceed that (and the ``d``-th eigenvalue must not be ~0). Each direction's sign is fixed (largest-magnitude entry positive, as scikit-learn's
    ``svd_flip``) so the basis is a deterministic function of the snapshots.
    """
    w = snapshots.weights if isinstance(snapshots, Trajectory) else snapshots
    if w.ndim != 2:
        raise InputError(f"dldr_subspace: snapshots must be [t, n], got shape {tuple(w.shape)}")
    t = w.shape[0]
    if not 1 <= d <= t - 1:
        raise InputError(f"dldr_subspace: d={d} needs 1 <= d <= t-1 = {t - 1} (centred {t} snapshots)")
    w64 = w.detach().to(torch.float64)
    mean = w64.mean(0)
    centred = w64 - mean
    gram = centred @ centred.T  # [t, t]: the paper's small eigenproblem (n >> t)
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    order = torch.argsort(evals, descending=True)[:d]
    top = evals[order].clamp_min(0.0)
    if float(top[-1]) <= 1e-12 * max(float(top[0]), 1e-300):
        raise InputError(f"dldr_subspace: the snapshots span fewer than d={d} directions "
                         f"(eigenvalue {float(top[-1]):.3g} vs {float(top[0]):.3g}); lower d or sample more")
    basis = centred.T @ evecs[:, order]  # [n, d] = right singular vectors times σ
    basis = basis / basis.norm(dim=0, keepdim=True)
    idx = basis.abs().argmax(0)
    signs = torch.sign(basis[idx, torch.arange(d)])
    signs[signs == 0] = 1.0
    basis = basis * signs
    explained = top / evals.clamp_min(0.0).sum().clamp_min(1e-300)
    return Subspace(mean.to(w.dtype), basis.contiguous().to(w.dtype), explained)


class ProjectedSGD(torch.optim.Optimizer):
    """P-SGD's update (step 4) as a torch optimizer: ``z ← z − lr·m``, ``m ← μ m + Pᵀ g``, then
    ``w = anchor + P z`` written back into the parameters.

    An optimizer (not a training loop) so :func:`fit` drives it unchanged — including under DDP,
    where ``g`` is already the all-reduced gradient. ``milestones`` are optimizer-step counts at
    which lr is multiplied by ``gamma`` (the reference code's MultiStepLR, in steps because
    :func:`fit` has no per-epoch scheduler hook).
    """

    def __init__(self, params: Any, P: torch.Tensor, anchor: torch.Tensor, *, lr: float = 1.0,
                 momentum: float = 0.9, milestones: Sequence[int] = (), gamma: float = 0.1) -> None:
        params = [p for p in params if p.requires_grad]
        super().__init__(params, {"lr": lr})
        n = sum(p.numel() for p in params)
        if P.ndim != 2 or P.shape[0] != n or anchor.shape != (n,):
            raise InputError(f"ProjectedSGD: P must be [{n}, d] and anchor [{n}], got "
                             f"{tuple(P.shape)} and {tuple(anchor.shape)}")
        dtype = params[0].dtype
        self.P = P.detach().to(dtype)
        self.anchor = anchor.detach().to(dtype)
        self.z = torch.zeros(P.shape[1], dtype=dtype)
        self.buf = torch.zeros_like(self.z)
        self.momentum = momentum
        self.milestones = sorted(milestones)
        self.gamma = gamma
        self.steps = 0
        self.params = params
        _set_params(params, self.weights())

    def weights(self) -> torch.Tensor:
        return self.anchor + self.P @ self.z

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D401 - torch signature
        loss = closure() if closure is not None else None
        lr = self.param_groups[0]["lr"] * self.gamma ** sum(1 for m in self.milestones if m <= self.steps)
        gz = self.P.T @ flat_grad(self.params)
        self.buf.mul_(self.momentum).add_(gz)
        self.z.add_(self.buf, alpha=-lr)
        _set_params(self.params, self.weights())
        self.steps += 1
        return loss


def psgd(
    model: nn.Module,
    P: torch.Tensor,
    anchor: torch.Tensor,
    loss_fn: Callable[[Any, Any], Any],
    data: tuple[Any, ...],
    *,
    epochs: int,
    lr: float = 1.0,
    momentum: float = 0.9,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    batch_size: int = 32,
    seed: int = 0,
    evaluate: Callable[[Any], dict[str, Any]] | None = None,
    log: TrainLog | None = None,
) -> list[dict[str, Any]]:
    """P-SGD (step 4): train ``model`` inside ``anchor + span(P)`` starting at ``anchor``.

    Defaults are the reference code's (lr 1, momentum 0.9, lr × 0.1 at the ``milestones``, given
    here in *epochs*). Uses :func:`fit` (same minibatch order for the same ``seed``, same logging,
    torchrun/DDP unchanged). Returns the per-epoch records; the model is left at the final point.
    """
    info = dist_info()
    per_epoch = len(batches(len(data[0]), batch_size, torch.Generator().manual_seed(0), info))
    opt = ProjectedSGD(model.parameters(), P, anchor, lr=lr, momentum=momentum,
                       milestones=[m * per_epoch for m in milestones], gamma=gamma)
    return fit(model, loss_fn, data, epochs=epochs, batch_size=batch_size, optimizer=opt, lr=lr, seed=seed,
               evaluate=evaluate, log=log)


def pbfgs(
    model: nn.Module,
    P: torch.Tensor,
    anchor: torch.Tensor,
    loss_fn: Callable[[Any, Any], Any],
    data: tuple[Any, ...],
    *,
    epochs: int,
    batch_size: int = 32,
    lr: float = 1.0,
    sigma: float = 0.4,
    shrink: float = 0.4,
    max_search: int = 20,
    seed: int = 0,
    evaluate: Callable[[Any], dict[str, Any]] | None = None,
    log: TrainLog | None = None,
) -> list[dict[str, Any]]:
    """P-BFGS (step 4): BFGS on the ``d`` coordinates ``z`` of ``w = anchor + P z``, from ``z = 0``.

    Per minibatch: ``g_z = Pᵀ ∇f``; if a previous step exists, ``y = g_z − g_z,prev`` and, when
    ``yᵀs > 0``, ``H ← (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ`` with ``ρ = 1/yᵀs`` (the inverse-Hessian
    BFGS update; ``H₀ = I``); direction ``p = −H g_z``; Armijo backtracking on the same minibatch,
    step ``α = lr·shrinkᵐ`` for the first ``m`` with ``f(w + α P p) ≤ f(w) + σ α g_zᵀ p``. If no
    trial passes in ``max_search`` the step is skipped (the reference code takes a ~1e-8-sized one).
    ``y`` compares gradients of consecutive minibatches, as in the reference code: stochastic, so
    the update is guarded by the curvature condition.

    The minibatch order is :func:`fit`'s for the same ``seed``. Logs per epoch the mean minibatch
    loss, ``evaluate``'s metrics, seconds, and the mean number of line-search trials. Single-process.
    """
    info = dist_info()
    if info.distributed:
        raise InputError("pbfgs runs single-process: its line search would need an all-reduce per trial")
    log = log or TrainLog(name="pbfgs")
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = params[0].dtype
    P = P.detach().to(dtype)
    anchor = anchor.detach().to(dtype)
    d = P.shape[1]
    z = torch.zeros(d, dtype=torch.float64)
    H = torch.eye(d, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    g_prev: torch.Tensor | None = None
    s_prev: torch.Tensor | None = None

    def weights(zz: torch.Tensor) -> torch.Tensor:
        return anchor + P @ zz.to(dtype)

    _set_params(params, weights(z))
    gen = torch.Generator().manual_seed(seed)
    n = len(data[0])
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        total, count, trials, skipped = 0.0, 0, 0, 0
        order = batches(n, batch_size, gen, None)
        for i, idx in enumerate(order, 1):
            batch = tuple(t[idx] for t in data)
            for p in params:
                p.grad = None
            loss = loss_fn(model, batch)
            loss.backward()
            f0 = float(loss.detach())
            g = (P.T @ flat_grad(params)).to(torch.float64)
            if g_prev is not None and s_prev is not None:
                y = g - g_prev
                ys = float(y @ s_prev)
                if ys > 1e-20:
                    rho = 1.0 / ys
                    left = eye - rho * torch.outer(s_prev, y)
                    H = left @ H @ left.T + rho * torch.outer(s_prev, s_prev)
            g_prev = g
            direction = -(H @ g)
            slope = float(g @ direction)
            if slope >= 0:  # H lost positive definiteness numerically: fall back to steepest descent
                H = eye.clone()
                direction = -g
                slope = float(g @ direction)
            alpha = lr
            accepted = False
            with torch.no_grad():
                for m in range(max_search):
                    trials += 1
                    _set_params(params, weights(z + alpha * direction))
                    f1 = float(loss_fn(model, batch))
                    if math.isfinite(f1) and f1 <= f0 + sigma * alpha * slope:
                        accepted = True
                        break
                    alpha *= shrink
            if accepted:
                s_prev = alpha * direction
                z = z + s_prev
            else:
                s_prev = None
                skipped += 1
            _set_params(params, weights(z))
            total += f0 * len(idx)
            count += len(idx)
            log.step(epoch, i, len(order), total / count)
        mean = total / max(count, 1)
        values = epoch_values(model, mean, epoch, evaluate, log)
        values["line_search_trials"] = round(trials / max(len(order), 1), 3)
        values["skipped_steps"] = skipped
        values["seconds"] = round(time.perf_counter() - t0, 3)
        log.epoch(epoch, **values)
    return log.records
