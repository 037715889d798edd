"""Compression-aware training: regularizers on the singular values of each layer, then truncation.

The survey's "compression-aware training" pushes a layer's spectrum towards low rank while it
trains, so that cutting the small singular values at the end costs little accuracy. Two
parametrisations of a layer's matrix ``W`` (a Linear's ``[out, in]``, a Conv2d's ``[out, in·kh·kw]``
unfolding):

- **dense**: ``W`` itself; its singular values come from ``torch.linalg.svdvals`` (differentiable
  where they are distinct) — used by the *nuclear norm* ``Σ σᵢ`` and the dense effective-rank
  penalty;
- **SVD-parametrised** (:class:`SVDParamLinear`, :class:`SVDParamConv2d`; Yang et al., "Learning Low-rank
  Deep Neural Networks via Singular Vector Orthogonality Regularization and Singular Value
  Sparsification", CVPR-W 2020): ``W = U diag(s) Vᵀ`` trained directly, with an orthogonality term
  ``‖UᵀU − I‖² + ‖VᵀV − I‖²`` that keeps ``s`` the singular values; sparsity on ``s`` by *l1*
  ``Σ|sᵢ|`` or *Hoyer* ``‖s‖₁/‖s‖₂`` (scale-invariant), or the *effective-rank* penalty.

The effective-rank penalty is the Shannon entropy ``H(p) = −Σ pᵢ log pᵢ`` of the normalised
singular values ``pᵢ = |sᵢ|/Σ|sⱼ|`` (``erank = exp H``, Roy & Vetterli 2007): it is
scale-invariant like Hoyer and minimal when the energy sits in few directions.

At the end :func:`truncate` replaces every SVD-parametrised layer by its thin form at the rank it
is given (or chosen by :func:`ranks_for_budget`: the same greedy energy-per-parameter rule for every
regularizer, so comparisons at matched parameter counts are fair): a Linear becomes
:class:`edgecomp.train.layers.LowRankLinear` (``MatMul(x, A)`` → ``Gemm``, the low-rank pass's
form), a Conv2d a ``k×k`` conv to ``r`` channels followed by a ``1×1`` conv (channel SVD).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from edgecomp.errors import InputError

__all__ = [
    "SVDParamLinear",
    "SVDParamConv2d",
    "svd_parametrize",
    "singular_values",
    "nuclear",
    "l1",
    "hoyer",
    "entropy",
    "effective_rank",
    "orthogonality",
    "orthogonality_of",
    "Regularizer",
    "REGULARIZERS",
    "ranks_for_budget",
    "truncate",
    "layer_spectra",
]

_EPS = 1e-12


class _SVDLayer(nn.Module):
    """``W = U diag(s) Vᵀ`` with ``U: [out, r]``, ``s: [r]``, ``V: [fan_in, r]``."""

    u: nn.Parameter
    s: nn.Parameter
    v: nn.Parameter

    def _init_factors(self, weight: torch.Tensor) -> None:
        mat = weight.detach().reshape(weight.shape[0], -1).double()
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        self.u = nn.Parameter(u.float().contiguous())
        self.s = nn.Parameter(s.float().contiguous())
        self.v = nn.Parameter(vh.T.float().contiguous())

    @property
    def rank(self) -> int:
        return int(self.s.shape[0])

    def matrix(self) -> torch.Tensor:
        """The dense ``[out, fan_in]`` matrix."""
        return (self.u * self.s) @ self.v.T

    def factors_pay(self, rank: int) -> bool:
        """Whether two thin factors at ``rank`` hold fewer params than the dense matrix."""
        return rank * (self.u.shape[0] + self.v.shape[0]) < self.u.shape[0] * self.v.shape[0]

    def factor_params(self, rank: int) -> int:
        """Params of the truncated layer at ``rank``: both factors + bias, or the dense matrix +
        bias where the factors would not be smaller (:meth:`thin` then gives a dense layer)."""
        bias = 0 if self.bias is None else self.bias.numel()
        rows, cols = self.u.shape[0], self.v.shape[0]
        return min(rank * (rows + cols), rows * cols) + bias

    def _dense(self, layer: nn.Module, rank: int) -> nn.Module:
        """``layer`` (a fresh dense twin) holding the rank-``rank`` matrix and the bias."""
        u, s, v = self._ordered(rank)
        with torch.no_grad():
            layer.weight.copy_(((u * s) @ v.T).reshape(layer.weight.shape))
            if self.bias is not None:
                layer.bias.copy_(self.bias.detach())
        return layer

    def _ordered(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``rank`` largest ``|s|`` terms; ``s``'s sign is folded into ``U``."""
        order = torch.argsort(self.s.detach().abs(), descending=True)[:rank]
        s = self.s.detach()[order]
        return self.u.detach()[:, order] * torch.sign(s), s.abs(), self.v.detach()[:, order]


class SVDParamLinear(_SVDLayer):
    """A Linear layer trained as ``U diag(s) Vᵀ`` (see the module doc)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_factors(linear.weight)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear((x @ self.v) * self.s, self.u, self.bias)

    def thin(self, rank: int) -> nn.Module:
        from edgecomp.train.layers import LowRankLinear

        if not self.factors_pay(rank):
            return self._dense(nn.Linear(self.in_features, self.out_features, bias=self.bias is not None), rank)
        u, s, v = self._ordered(rank)
        root = s.sqrt()
        bias = None if self.bias is None else self.bias.detach()
        return LowRankLinear.from_factors((v * root).T.contiguous(), (u * root).contiguous(), bias)


class SVDParamConv2d(_SVDLayer):
    """A Conv2d trained as a ``k×k`` conv to ``r`` channels (``Vᵀ``), a scale ``s`` and a ``1×1``
    conv (``U``): the SVD of the ``[out, in·kh·kw]`` unfolding (groups=1 only)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.groups != 1:
            raise InputError(f"SVDParamConv2d: grouped/depthwise conv (groups={conv.groups}) has no channel SVD")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        if isinstance(self.padding, str):
            raise InputError(f"SVDParamConv2d: padding={self.padding!r} is not supported (give explicit pads)")
        self._init_factors(conv.weight)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())

    def _kernel(self, v: torch.Tensor) -> torch.Tensor:
        return v.T.reshape(v.shape[1], self.in_channels, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self._kernel(self.v), None, self.stride, self.padding, self.dilation)
        h = h * self.s[None, :, None, None]
        return F.conv2d(h, self.u[:, :, None, None], self.bias)

    def thin(self, rank: int) -> nn.Module:
        if not self.factors_pay(rank):
            return self._dense(nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                         self.padding, self.dilation, bias=self.bias is not None), rank)
        u, s, v = self._ordered(rank)
        first = nn.Conv2d(self.in_channels, rank, self.kernel_size, self.stride, self.padding, self.dilation, bias=False)
        last = nn.Conv2d(rank, self.out_channels, 1, bias=self.bias is not None)
        with torch.no_grad():
            root = s.sqrt()
            first.weight.copy_(self._kernel(v * root))
            last.weight.copy_((u * root)[:, :, None, None])
            if self.bias is not None:
                last.bias.copy_(self.bias.detach())
        return nn.Sequential(first, last)


def _replace(module: nn.Module, pick: Callable[[str, nn.Module], nn.Module | None], prefix: str = "") -> None:
    for name, child in list(module.named_children()):
        full = f"{prefix}{name}"
        new = pick(full, child)
        if new is not None:
            setattr(module, name, new)
        else:
            _replace(child, pick, f"{full}.")


def svd_parametrize(model: nn.Module, *, min_rank: int = 2, skip: tuple[str, ...] = ()) -> nn.Module:
    """A copy of ``model`` with every Linear and (groups=1) Conv2d whose matrix has rank ≥
    ``min_rank`` replaced by its SVD-parametrised twin (same function at initialisation);
    layer names in ``skip`` are left dense (e.g. a tiny first conv or the classifier)."""

    def pick(name: str, m: nn.Module) -> nn.Module | None:
        if name in skip:
            return None
        if isinstance(m, nn.Linear) and min(m.in_features, m.out_features) >= min_rank:
            return SVDParamLinear(m)
        if isinstance(m, nn.Conv2d) and m.groups == 1 and not isinstance(m.padding, str):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            if min(m.out_channels, fan_in) >= min_rank:
                return SVDParamConv2d(m)
        return None

    out = copy.deepcopy(model)
    _replace(out, pick)
    return out


def _svd_layers(model: nn.Module) -> Iterator[tuple[str, _SVDLayer]]:
    for name, m in model.named_modules():
        if isinstance(m, _SVDLayer):
            yield name, m


def _dense_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1):
            yield name, m


def singular_values(layer: nn.Module) -> torch.Tensor:
    """|s| of an SVD-parametrised layer, or ``svdvals`` of a dense layer's matrix (differentiable)."""
    if isinstance(layer, _SVDLayer):
        return layer.s.abs()
    w = layer.weight
    return torch.linalg.svdvals(w.reshape(w.shape[0], -1))


def nuclear(s: torch.Tensor) -> torch.Tensor:
    return s.abs().sum()


l1 = nuclear  # on an SVD-parametrised layer the l1 norm of s is the nuclear norm of W (U, V orthonormal)


def hoyer(s: torch.Tensor) -> torch.Tensor:
    a = s.abs()
    return a.sum() / (a.norm() + _EPS)


def entropy(s: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of the normalised singular values: ``log`` of the effective rank."""
    a = s.abs()
    p = a / (a.sum() + _EPS)
    return -(p * torch.log(p + _EPS)).sum()


def effective_rank(s: torch.Tensor) -> float:
    return float(torch.exp(entropy(s.detach())))


def orthogonality(layer: _SVDLayer) -> torch.Tensor:
    """``‖UᵀU − I‖²_F + ‖VᵀV − I‖²_F``, normalised by ``r²`` so its weight does not depend on the size."""
    return orthogonality_of(layer.u, layer.v)


def orthogonality_of(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r = u.shape[1]
    eye = torch.eye(r, dtype=u.dtype)
    return (((u.T @ u - eye) ** 2).sum() + ((v.T @ v - eye) ** 2).sum()) / (r * r)


#: name → (penalty on a layer's singular values, parametrisation it acts on)
REGULARIZERS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor] | None, str]] = {
    "none": (None, "svd"),
    "nuclear": (nuclear, "dense"),
    "erank-dense": (entropy, "dense"),
    "l1": (l1, "svd"),
    "hoyer": (hoyer, "svd"),
    "erank": (entropy, "svd"),
}


@dataclass
class Regularizer:
    """``strength · Σ_layers penalty(s_layer) + ortho · Σ_layers orthogonality(layer)``.

    ``kind`` is one of :data:`REGULARIZERS`; ``svd`` kinds need a model from :func:`svd_parametrize`,
    ``dense`` kinds act on plain Linear/Conv2d weights (skipping names in ``skip``). The nuclear and
    l1 penalties are divided by the layer's initial ``Σ|s|`` so one strength suits layers of any scale.
    """

    kind: str
    strength: float
    ortho: float = 1.0
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in REGULARIZERS:
            raise InputError(f"unknown regularizer {self.kind!r}; choose one of {', '.join(REGULARIZERS)}")
        if not (self.strength >= 0 and math.isfinite(self.strength)):
            raise InputError(f"regularizer strength must be a finite number >= 0, got {self.strength}")
        self._scale: dict[str, float] = {}

    @property
    def parametrisation(self) -> str:
        return REGULARIZERS[self.kind][1]

    def layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        found = list(_svd_layers(model)) if self.parametrisation == "svd" else list(_dense_layers(model))
        return [(n, m) for n, m in found if n not in self.skip]

    def __call__(self, model: nn.Module) -> torch.Tensor:
        penalty_fn = REGULARIZERS[self.kind][0]
        total = torch.zeros(())
        for name, layer in self.layers(model):
            if penalty_fn is not None and self.strength > 0:
                s = singular_values(layer)
                value = penalty_fn(s)
                if penalty_fn is nuclear:
                    scale = self._scale.setdefault(name, float(s.detach().abs().sum()) or 1.0)
                    value = value / scale
                total = total + self.strength * value
            if isinstance(layer, _SVDLayer) and self.ortho > 0:
                total = total + self.ortho * orthogonality(layer)
        return total


def layer_spectra(model: nn.Module) -> dict[str, torch.Tensor]:
    """name → |singular values| (descending) of every SVD-parametrised layer, or of every dense
    Linear/Conv2d when the model has none."""
    layers = list(_svd_layers(model)) or list(_dense_layers(model))
    with torch.no_grad():
        return {n: torch.sort(singular_values(m).detach().abs(), descending=True).values for n, m in layers}


def ranks_for_budget(model: nn.Module, params: int) -> dict[str, int]:
    """Per-layer ranks for the SVD-parametrised layers so that the whole truncated model has at
    most ``params`` parameters: start at full rank, then repeatedly drop the singular value whose
    loss of *relative* energy ``sᵢ²/‖s‖²`` per parameter saved is smallest (greedy, every layer
    keeps rank ≥ 1). Regularizer-agnostic, so methods are compared at the same budget."""
    layers = dict(_svd_layers(model))
    if not layers:
        raise InputError("ranks_for_budget: the model has no SVD-parametrised layers (svd_parametrize first)")
    spectra = {n: torch.sort(m.s.detach().abs().double(), descending=True).values for n, m in layers.items()}
    energy = {n: float((s ** 2).sum()) or 1.0 for n, s in spectra.items()}
    ranks = {n: m.rank for n, m in layers.items()}
    other = sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[0] not in layers)
    cost = {n: m.u.shape[0] + m.v.shape[0] for n, m in layers.items()}

    def total() -> int:
        return other + sum(m.factor_params(ranks[n]) for n, m in layers.items())

    while total() > params:
        candidates = [(float(spectra[n][ranks[n] - 1] ** 2) / energy[n] / cost[n], n) for n in layers if ranks[n] > 1]
        if not candidates:
            raise InputError(f"a budget of {params} params is below the model's minimum ({total()} at rank 1 everywhere)")
        ranks[min(candidates)[1]] -= 1
    return ranks


def truncate(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """A copy of ``model`` with each SVD-parametrised layer replaced by its thin form at its rank."""
    out = copy.deepcopy(model)
    missing = set(ranks) - {n for n, _ in _svd_layers(out)}
    if missing:
        raise InputError(f"truncate: no SVD-parametrised layer named {sorted(missing)[0]!r}")

    def pick(name: str, m: nn.Module) -> nn.Module | None:
        if isinstance(m, _SVDLayer):
            return m.thin(max(1, min(ranks.get(name, m.rank), m.rank)))
        return None

    _replace(out, pick)
    return out


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def summary(model: nn.Module) -> dict[str, Any]:
    """Effective rank of every layer's spectrum (for the per-epoch log)."""
    return {name: round(effective_rank(s), 2) for name, s in layer_spectra(model).items()}
