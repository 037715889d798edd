"""``factorize(module, policy)``: the low-rank pass, on a PyTorch module instead of an ONNX graph.

Why: to train a network factorized (fine-tune after truncation, compression-aware training) the
factorization has to happen on the torch side; doing it with the pass's own rules means the model
that comes out is the one ``edgecomp build --lowrank POLICY`` would have made of the same weights
(same ranks, same decompositions, same "only when it pays" decisions), and exports to the same
ONNX (see :mod:`edgecomp.train.layers`).

What is shared with ``passes/lowrank.py``: policies (``rank_selection.parse_policy``: ``erank``,
``energy``, ``l1``, ``ratio``, ``rank``, ``ranks:NAME=R``, and the global
``budget:params|flops=Nx`` / ``budget:cosine|top1=T`` via ``greedy_allocate``), the per-layer
objects (spectrum, cost, error), the rules (layers under ``min_params`` params stay, a
factorization must save ``1 - min_saving`` of both params and MACs, and stay within
``max_layer_error``). What differs is only where numbers come from: calibration statistics are
collected with forward hooks on the torch module (input moments make Linear and 1x1 convs
data-aware; input shapes give MACs per sample), and a global budget's sensitivity is measured by
swapping torch modules in and running the calibration batch.

The input module is never changed: it is deep-copied first, and calibration runs on the copy in
eval mode (BatchNorm statistics untouched), its train/eval flags restored afterwards.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from edgecomp.errors import InputError
from edgecomp.passes.lowrank import FactorizableLayer
from edgecomp.passes.lowrank_conv import CONV_METHODS
from edgecomp.passes.rank_selection import RankPolicy, effective_rank, greedy_allocate, parse_policy
from edgecomp.train.layers import Factorized, conv_decomposition, factorized_from, linear_decomposition, tt_decomposition

__all__ = ["factorize", "LAYER_KINDS"]

#: ``layers=`` kinds: ``linear`` (SVD of nn.Linear), ``conv`` (nn.Conv2d by ``conv_method``; 1x1 by
#: SVD), ``tt`` (tensor-train nn.Linear where its dims factor; with ``linear`` too, the others by SVD)
LAYER_KINDS = ("linear", "conv", "tt")


@dataclasses.dataclass
class _Stats:
    """What the calibration batch showed about one layer's input."""

    moment: np.ndarray | None = None  # XᵀX summed (float64); divided by rows on use
    rows: int = 0
    positions: int = 1  # rows of a Linear's input per sample (tokens)
    input_hw: tuple[int, int] | None = None
    output_hw: tuple[int, int] | None = None


@dataclasses.dataclass
class _Candidate:
    name: str
    kind: str  # linear | conv | tt
    dense: nn.Module
    layer: FactorizableLayer | None  # None: kept, see ``reason``
    reason: str | None = None
    shapes_known: bool = False


def _policy(policy: str | RankPolicy) -> RankPolicy:
    if isinstance(policy, RankPolicy):
        return policy
    if not isinstance(policy, str):
        raise InputError(f"factorize: policy must be a string such as 'erank' or 'energy:0.95', not {type(policy).__name__}")
    try:
        return parse_policy(policy)
    except InputError as err:
        raise InputError(f"factorize: {str(err).removeprefix('--lowrank ')}") from None


def _kinds(layers: str | Sequence[str], conv_method: str) -> tuple[str, ...]:
    kinds = (layers,) if isinstance(layers, str) else tuple(layers)
    unknown = [k for k in kinds if k not in LAYER_KINDS]
    if unknown:
        raise InputError(f"factorize: unknown layer kind {unknown[0]!r} (known: {', '.join(LAYER_KINDS)})")
    if conv_method not in CONV_METHODS:
        raise InputError(f"factorize: unknown conv_method {conv_method!r} (known: {', '.join(CONV_METHODS)})")
    return kinds


# -- calibration ----------------------------------------------------------------------------------
def _as_inputs(calib: Any) -> tuple[torch.Tensor, ...]:
    items = calib if isinstance(calib, (tuple, list)) else (calib,)
    return tuple(torch.as_tensor(x) for x in items)


def _collect(model: nn.Module, calib: Any) -> dict[str, _Stats]:
    """Run ``calib`` through ``model`` (eval mode, no grad) with hooks on every Linear/Conv2d."""
    stats: dict[str, _Stats] = {}
    hooks = []

    def hook(name: str, mod: nn.Module) -> Callable:
        def fn(_m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0].detach()
            st = stats.setdefault(name, _Stats())
            if isinstance(mod, nn.Linear):
                rows = x.reshape(-1, x.shape[-1]).double()
                st.positions = max(1, x[0].numel() // x.shape[-1]) if x.dim() > 1 else 1
            else:
                st.input_hw, st.output_hw = tuple(x.shape[-2:]), tuple(output.shape[-2:])
                if mod.kernel_size != (1, 1) or mod.groups != 1:
                    return
                rows = x.movedim(-3, -1).reshape(-1, x.shape[-3]).double()
            gram = (rows.T @ rows).cpu().numpy()
            st.moment = gram if st.moment is None else st.moment + gram
            st.rows += rows.shape[0]
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            hooks.append(mod.register_forward_hook(hook(name, mod)))
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*_as_inputs(calib))
    finally:
        for h in hooks:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    return stats


# -- which layers, and their pass objects ---------------------------------------------------------
def _tied(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (tied weights)."""
    seen: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, n in seen.items() if n > 1}


def _inside_factorized(model: nn.Module) -> set[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, Factorized)]
    return {n for n, _ in model.named_modules() if any(n.startswith(f + ".") for f in names)}


def _linear_candidate(name: str, mod: nn.Linear, kinds: tuple[str, ...], st: _Stats | None) -> _Candidate | None:
    moment = st.moment / st.rows if st is not None and st.moment is not None and st.rows else None
    positions = st.positions if st is not None else 1
    if "tt" in kinds:
        try:
            layer = tt_decomposition(mod, positions=positions, name=name)
            if moment is not None:
                layer.set_input_moment(moment, st.rows)
            return _Candidate(name, "tt", mod, layer, shapes_known=st is not None)
        except ValueError:
            if "linear" not in kinds:
                why = f"{mod.in_features}x{mod.out_features} does not factor into TT modes"
                return _Candidate(name, "tt", mod, None, f"kept dense ({why})")
    if "linear" not in kinds:
        return None
    layer = linear_decomposition(mod, moment=moment, rows=st.rows if st else None, positions=positions, name=name)
    return _Candidate(name, "linear", mod, layer, shapes_known=st is not None)


def _conv_candidate(name: str, mod: nn.Conv2d, method: str, st: _Stats | None) -> _Candidate:
    if mod.groups != 1:
        kind = "depthwise" if mod.weight.shape[1] == 1 else "grouped"
        return _Candidate(name, "conv", mod, None, f"kept dense ({kind} conv)")
    if mod.padding_mode != "zeros":
        return _Candidate(name, "conv", mod, None, f"kept dense (padding_mode {mod.padding_mode})")
    moment = st.moment / st.rows if st is not None and st.moment is not None and st.rows else None
    layer = conv_decomposition(mod, method, moment=moment, rows=st.rows if st else None, name=name,
                               input_hw=st.input_hw if st else None, output_hw=st.output_hw if st else None)
    return _Candidate(name, "conv", mod, layer, shapes_known=st is not None and st.input_hw is not None)


def _candidates(model: nn.Module, kinds: tuple[str, ...], method: str, stats: dict[str, _Stats]) -> list[_Candidate]:
    tied, skip = _tied(model), _inside_factorized(model)
    found = []
    for name, mod in model.named_modules():
        if name in skip or not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        if isinstance(mod, nn.Linear):
            cand = _linear_candidate(name, mod, kinds, stats.get(name))
        elif "conv" in kinds:
            cand = _conv_candidate(name, mod, method, stats.get(name))
        else:
            cand = None
        if cand is not None and id(mod.weight) in tied:
            cand = _Candidate(name, cand.kind, mod, None, "kept dense (tied weight)")
        if cand is not None:
            found.append(cand)
    return found


# -- replacing modules ----------------------------------------------------------------------------
def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name each module is reachable under: a module used at two places is one layer,
    replaced at both (``named_modules`` lists it once)."""
    names: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), []).append(name)
    return names


def _build(cand: _Candidate, rank: int) -> Factorized:
    new = factorized_from(cand.layer, rank, cand.dense)
    new.train(cand.dense.training)
    new.requires_grad_(cand.dense.weight.requires_grad)
    return new


# -- global budget --------------------------------------------------------------------------------
def _outputs(y: Any) -> list[torch.Tensor]:
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        y = list(y.values())
    return [t for item in y for t in _outputs(item)]


def _metric(kind: str, ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """Like ``numerics.Comparison.budget_metric``: ``top1`` is the lowest argmax agreement over
    classifier-like ([batch, classes]) outputs; otherwise the lowest per-output mean cosine."""
    if kind == "top1":
        tops = [float((g.argmax(-1) == r.argmax(-1)).double().mean()) for r, g in zip(ref, got) if r.dim() == 2 and r.shape[-1] > 1]
        if tops:
            return min(tops)
    cos = [float(nn.functional.cosine_similarity(r.reshape(len(r), -1).double(), g.reshape(len(g), -1).double(), dim=1, eps=1e-30).mean())
           for r, g in zip(ref, got)]
    return min(cos)


def _allocate(model: nn.Module, cands: list[_Candidate], policy: RankPolicy, calib: Any, pays: Callable,
              max_error: float) -> dict[str, int]:
    """Ranks for a global budget: the pass's ladder + greedy allocation, with sensitivity measured
    by swapping the factorized modules into ``model`` and running ``calib``."""
    inputs = _as_inputs(calib)
    was = {m: m.training for m in model.modules()}
    model.eval()
    by_name = {c.name: c for c in cands}

    def run() -> list[torch.Tensor]:
        with torch.no_grad():
            return _outputs(model(*inputs))

    ref = run()
    kind = policy.budget if policy.budget == "top1" else "cosine"

    aliases = _aliases(model)

    def swap(name: str, module: nn.Module) -> None:
        for alias in aliases[id(by_name[name].dense)]:
            _set(model, alias, module)

    def metric(ranks: dict[str, int]) -> float:
        try:
            for name, rank in ranks.items():
                swap(name, _build(by_name[name], rank))
            return _metric(kind, ref, run())
        finally:
            for name in ranks:
                swap(name, by_name[name].dense)

    unit = "macs" if policy.budget == "flops" else "params"
    ladders = {}
    try:
        for c in cands:
            ladder = [(c.layer.full_rank, float(getattr(c.layer.cost(None), unit)), 0.0)]
            for rank in c.layer.candidate_ranks():
                if pays(c.layer, rank) and c.layer.error(rank) <= max_error:
                    ladder.append((rank, float(getattr(c.layer.cost(rank), unit)), 1.0 - metric({c.name: rank})))
            ladders[c.name] = ladder
        dense_total = sum(ladder[0][1] for ladder in ladders.values())
        if unit == "params":  # the budget is over the whole model, as in the pass
            dense_total += sum(p.numel() for p in model.parameters()) - sum(c.layer.cost(None).params for c in cands)
        ranks, _ = greedy_allocate(ladders, float(dense_total), policy, metric)
    finally:
        for m, flag in was.items():
            m.training = flag
    return ranks


# -- the driver -----------------------------------------------------------------------------------
def _decision(c: _Candidate, rank: int | None, active: bool, pays: Callable, max_error: float, min_params: int) -> str:
    """The pass's rule, in its order and words."""
    if not active:
        return f"kept dense (below {min_params} params)"
    if rank is None:
        return "kept dense (policy)"
    if rank >= c.layer.full_rank or not pays(c.layer, rank):
        return "kept dense (does not pay)"
    error = c.layer.error(rank)
    return f"kept dense (error {error:.3g} > {max_error:g})" if error > max_error else "factorized"


def _record(c: _Candidate, rank: int | None, decision: str) -> dict[str, Any]:
    """One layer's record; params/MACs ``after`` are those of the layer in the returned module,
    ``error`` is at the rank considered (also when the layer was kept)."""
    rec: dict[str, Any] = {"name": c.name, "kind": c.kind, "weight_shape": list(c.dense.weight.shape),
                           "decision": decision, "weight_error": 0.0}
    if c.layer is None:
        params = sum(p.numel() for p in c.dense.parameters())
        return {**rec, "method": None, "rank": None, "full_rank": None, "erank": None,
                "params": [params, params], "macs": None, "error": 0.0}
    low = rank is not None and rank < c.layer.full_rank
    dense = c.layer.cost(None)
    after = c.layer.cost(rank) if decision == "factorized" else dense
    return {**rec, "method": c.layer.method, "rank": rank, "full_rank": int(c.layer.full_rank),
            "erank": round(effective_rank(c.layer.spectrum()), 3),
            "params": [dense.params, after.params],
            "macs": [dense.macs, after.macs] if c.shapes_known else None,
            "error": float(c.layer.error(rank)) if low else 0.0}


def _weight_error(dense: nn.Module, new: Factorized) -> float:
    with torch.no_grad():
        w = dense.weight.double()
        return float(torch.linalg.norm(new.dense_weight().double() - w) / torch.linalg.norm(w)) if w.any() else 0.0


def factorize(
    module: nn.Module,
    policy: str | RankPolicy,
    *,
    layers: str | Sequence[str] = ("linear", "conv"),
    conv_method: str = "tucker2",
    calib: Any = None,
    max_layer_error: float | None = None,
    min_params: int = 1024,
    min_saving: float = 0.9,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """A copy of ``module`` with its Linear/Conv2d layers factorized where it pays.

    Args:
        policy: a ``--lowrank`` policy string (``"erank"``, ``"energy:0.95"``, ``"rank:8"``,
            ``"ranks:fc1=16"`` by module name, ``"budget:params=2x"``...) or a ``RankPolicy``.
        layers: kinds to factorize (:data:`LAYER_KINDS`).
        conv_method: ``tucker2``, ``cp`` or ``spatial`` for k×k convs (1x1 convs: SVD).
        calib: an input batch (a tensor, or a tuple of the module's inputs): makes Linear and 1x1
            convs data-aware (whitened SVD, output-space error), gives MACs per sample, and is
            needed by a global budget.
        max_layer_error: a layer whose relative error at its rank exceeds this stays dense.
        min_params, min_saving: the pass's rules (``LowRankConfig``).
    Returns:
        ``(new_module, records)``: one record per layer considered (name, kind, method, rank,
        full_rank, erank, params and MACs ``[before, after]`` (MACs per sample, ``None`` without
        calibration shapes), ``error`` (the pass's measure: output-space when data-aware, else
        weight-space), ``weight_error`` ‖W−W_r‖/‖W‖ of the module built, and ``decision``).
    """
    rank_policy = _policy(policy)
    kinds = _kinds(layers, conv_method)
    if rank_policy.is_global and calib is None:
        raise InputError(f"factorize: the global budget {rank_policy} needs a calibration batch (calib=)")
    max_error = math.inf if max_layer_error is None else float(max_layer_error)
    new = copy.deepcopy(module)
    stats = _collect(new, calib) if calib is not None else {}
    cands = _candidates(new, kinds, conv_method, stats)
    active = [c for c in cands if c.layer is not None and c.layer.cost(None).params >= min_params]
    active_names = {c.name for c in active}

    def pays(layer: FactorizableLayer, rank: int) -> bool:
        dense, low = layer.cost(None), layer.cost(rank)
        return all(getattr(low, k) <= min_saving * getattr(dense, k) for k in layer.saves)

    if rank_policy.is_global:
        chosen = _allocate(new, active, rank_policy, calib, pays, max_error)
    else:
        chosen = {c.name: rank_policy.layer_rank(c.name, c.layer.spectrum(), c.layer.full_rank) for c in active}
    aliases = _aliases(new)
    records = []
    for c in cands:
        rank = chosen.get(c.name)
        decision = c.reason or _decision(c, rank, c.name in active_names, pays, max_error, min_params)
        rec = _record(c, rank, decision)
        if decision == "factorized":
            layer = _build(c, rank)
            for alias in aliases[id(c.dense)]:
                _set(new, alias, layer)
            rec["weight_error"] = _weight_error(c.dense, layer)
        records.append(rec)
    return new, records
