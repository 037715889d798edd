"""How many singular values to keep: per-layer rules and a global budget.

Per layer (from the layer's singular values ``s``, largest first):

- ``erank[:SCALE]`` effective rank (Roy & Vetterli 2007): ``exp(H(p))``, ``p_i = s_i / Σ s``,
  times ``SCALE`` (default 1), rounded up;
- ``energy:F`` smallest rank keeping a fraction ``F`` of ``Σ s²``;
- ``l1:F`` smallest rank keeping a fraction ``F`` of ``Σ s`` (the l1 norm of the spectrum);
- ``ratio:F`` a fixed fraction of the full rank; ``rank:R`` a fixed rank;
- ``ranks:NODE=R,NODE=R`` explicit ranks (other layers are left alone).

Global (``budget:params=2x``, ``budget:flops=3x``, ``budget:cosine=0.98``, ``budget:top1=0.99``):
ranks are allocated across layers by measured sensitivity on calibration data, greedily
(AIMET-style): every layer is evaluated alone at a ladder of ranks, moves are ordered by cost
saved per unit of metric lost, and the shortest prefix of that order meeting the target (or, for
a metric target, the longest prefix whose *measured* metric still meets it) is taken.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

from edgecomp.errors import InputError

__all__ = [
    "effective_rank",
    "energy_rank",
    "l1_rank",
    "RankPolicy",
    "parse_policy",
    "Move",
    "greedy_allocate",
    "RANK_LADDER",
]

# Fractions of the full rank tried per layer when allocating a global budget.
RANK_LADDER = (1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4)


def _spectrum(s: Sequence[float]) -> np.ndarray:
    s = np.abs(np.asarray(s, dtype=np.float64)).ravel()
    return np.sort(s)[::-1]


def effective_rank(s: Sequence[float]) -> float:
    """exp of the Shannon entropy of the normalized singular values (1 ≤ erank ≤ len(s))."""
    s = _spectrum(s)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def _cumulative_rank(values: np.ndarray, fraction: float) -> int:
    total = values.sum()
    if total <= 0:
        return 1
    cum = np.cumsum(values) / total
    return int(min(len(values), np.searchsorted(cum, fraction - 1e-12) + 1))


def energy_rank(s: Sequence[float], fraction: float) -> int:
    """Smallest rank whose singular values hold ``fraction`` of the energy Σ s²."""
    return _cumulative_rank(_spectrum(s) ** 2, fraction)


def l1_rank(s: Sequence[float], fraction: float) -> int:
    """Smallest rank whose singular values hold ``fraction`` of Σ s."""
    return _cumulative_rank(_spectrum(s), fraction)


@dataclasses.dataclass(frozen=True)
class RankPolicy:
    """A parsed ``--lowrank`` value (see the module docstring)."""

    kind: str  # erank | energy | l1 | ratio | rank | ranks | budget
    value: float = 1.0
    budget: str | None = None  # params | flops | cosine | top1 (kind == "budget")
    ranks: tuple[tuple[str, int], ...] = ()

    @property
    def is_global(self) -> bool:
        return self.kind == "budget"

    def layer_rank(self, name: str, s: Sequence[float], full_rank: int) -> int | None:
        """The rank this per-layer policy keeps for one layer (None: leave the layer alone)."""
        if self.kind == "ranks":
            r = dict(self.ranks).get(name)
            return None if r is None else max(1, min(int(r), full_rank))
        if self.kind == "erank":
            r = math.ceil(self.value * effective_rank(s) - 1e-9)
        elif self.kind == "energy":
            r = energy_rank(s, self.value)
        elif self.kind == "l1":
            r = l1_rank(s, self.value)
        elif self.kind == "ratio":
            r = math.ceil(self.value * full_rank - 1e-9)
        elif self.kind == "rank":
            r = int(self.value)
        else:
            raise ValueError(f"{self.kind} is not a per-layer policy")
        return max(1, min(int(r), full_rank))

    def __str__(self) -> str:
        if self.kind == "budget":
            return f"budget:{self.budget}={self.value:g}" + ("x" if self.budget in ("params", "flops") else "")
        if self.kind == "ranks":
            return "ranks:" + ",".join(f"{n}={r}" for n, r in self.ranks)
        return f"{self.kind}:{self.value:g}"


def parse_policy(text: str) -> RankPolicy:
    """Parse ``erank:1.0``, ``energy:0.95``, ``budget:params=2x``... into a :class:`RankPolicy`."""
    kind, _, arg = text.strip().partition(":")
    kind = kind.strip().lower()
    bad = InputError(
        f"--lowrank {text!r}: expected erank[:SCALE], energy:F, l1:F, ratio:F, rank:R, "
        f"ranks:NODE=R,..., or budget:params=NX|flops=NX|cosine=C|top1=A"
    )
    try:
        if kind == "erank":
            value = float(arg) if arg else 1.0
            if value <= 0:
                raise bad
            return RankPolicy("erank", value)
        if kind in ("energy", "l1", "ratio"):
            value = float(arg)
            if not 0 < value <= 1:
                raise InputError(f"--lowrank {text!r}: {kind} takes a fraction in (0, 1]")
            return RankPolicy(kind, value)
        if kind == "rank":
            value = int(arg)
            if value < 1:
                raise bad
            return RankPolicy("rank", value)
        if kind == "ranks":
            pairs = []
            for item in arg.split(","):
                name, _, r = item.rpartition("=")
                if not name or int(r) < 1:
                    raise bad
                pairs.append((name.strip(), int(r)))
            return RankPolicy("ranks", ranks=tuple(pairs))
        if kind == "budget":
            what, _, v = arg.partition("=")
            what = what.strip().lower()
            if what in ("params", "flops"):
                value = float(v.strip().lower().rstrip("x"))
                if value <= 1:
                    raise InputError(f"--lowrank {text!r}: a {what} budget is a reduction factor > 1 (e.g. 2x)")
                return RankPolicy("budget", value, budget=what)
            if what in ("cosine", "top1"):
                value = float(v)
                if not 0 < value <= 1:
                    raise InputError(f"--lowrank {text!r}: {what} target must be in (0, 1]")
                return RankPolicy("budget", value, budget=what)
    except ValueError:
        raise bad from None
    raise bad


@dataclasses.dataclass(frozen=True)
class Move:
    """Lower one layer's rank: saves ``saved`` (params or MACs) and costs ``loss`` of the metric."""

    layer: str
    rank: int
    saved: float
    loss: float


def greedy_allocate(
    ladders: dict[str, list[tuple[int, float, float]]],
    dense_total: float,
    budget: RankPolicy,
    evaluate: Callable[[dict[str, int]], float] | None = None,
) -> tuple[dict[str, int], list[Move]]:
    """Pick ranks for a global budget.

    Args:
        ladders: per layer, ``(rank, cost, loss)`` for each candidate rank, where ``cost`` is the
            layer's params or MACs at that rank (the budget's unit) and ``loss`` the drop of the
            metric measured with that layer alone factorized at that rank; the first entry of
            every ladder is the dense layer ``(full_rank, dense_cost, 0.0)``.
        dense_total: params or MACs of the whole model before factorization.
        budget: ``budget:params|flops=N`` (reduce the total N-fold) or ``budget:cosine|top1=T``.
        evaluate: metric of the model with a rank assignment applied (needed for metric budgets).
    Returns:
        (layer → rank for the layers to factorize, the greedy moves taken in order).
    """
    # Each layer descends its ladder; a step's price is metric lost per unit of cost saved.
    moves: list[Move] = []
    position = {name: 0 for name in ladders}
    while True:
        best = None
        for name, ladder in ladders.items():
            i = position[name]
            if i + 1 >= len(ladder):
                continue
            _, cost0, loss0 = ladder[i]
            # Look ahead to the step with the best price (skips non-convex bumps in the curve).
            for j in range(i + 1, len(ladder)):
                rank, cost1, loss1 = ladder[j]
                saved = cost0 - cost1
                if saved <= 0:
                    continue
                price = max(loss1 - loss0, 0.0) / saved
                if best is None or price < best[0]:
                    best = (price, name, j, Move(name, rank, saved, max(loss1 - loss0, 0.0)))
        if best is None:
            break
        _, name, j, move = best
        position[name] = j
        moves.append(move)

    def assignment(prefix: int) -> dict[str, int]:
        ranks: dict[str, int] = {}
        for m in moves[:prefix]:
            ranks[m.layer] = m.rank
        return ranks

    if budget.budget in ("params", "flops"):
        target = dense_total / budget.value
        total = dense_total
        for k, m in enumerate(moves, 1):
            total -= m.saved
            if total <= target:
                return assignment(k), moves[:k]
        return assignment(len(moves)), moves  # the target is out of reach: compress all that pays
    if evaluate is None:
        raise ValueError("a metric budget needs an evaluate() callback")
    # Longest prefix whose measured metric meets the target (metric falls along the greedy order).
    lo, hi = 0, len(moves)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if evaluate(assignment(mid)) >= budget.value:
            lo = mid
        else:
            hi = mid - 1
    return assignment(lo), moves[:lo]
