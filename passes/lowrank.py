"""The low-rank pass: find factorizable layers, choose their ranks, rewrite those that pay.

Layer kinds are plugged in as *factorizers* (``lowrank_gemm.py``, ``lowrank_conv.py``, ...): each
finds its layers in the graph and wraps them as :class:`FactorizableLayer`, which knows its
spectrum, its cost at a rank, its error at a rank, and how to rewrite itself. This file owns what
is common: calibration statistics, rank selection (per layer or a global budget), the "only when
it pays" rule, and the per-layer stats record.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from typing import Any, Callable, Sequence

import numpy as np
import onnx_ir as ir
import threadpoolctl
import onnx_ir.passes.common  # noqa: F401

from edgecomp.errors import InputError
from edgecomp.numerics import Samples
from edgecomp.passes import activations
from edgecomp.passes.base import StatsResult
from edgecomp.passes.rank_selection import RANK_LADDER, RankPolicy, effective_rank, greedy_allocate

__all__ = [
    "Cost", "FactorizableLayer", "LowRankConfig", "LowRank", "register_factorizer", "FACTORIZERS", "calibration_probe",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Cost:
    params: int
    macs: int  # per inference, with the shapes the graph has


class FactorizableLayer(abc.ABC):
    """One layer a factorizer can rewrite (a node with a constant weight)."""

    #: the node's name (unique: the pass runs NameFixPass first)
    name: str
    #: ONNX op and the decomposition used, e.g. ("MatMul", "svd") or ("Conv", "tucker2")
    op: str
    method: str
    #: shape of the constant weight
    weight_shape: tuple[int, ...]

    @property
    @abc.abstractmethod
    def full_rank(self) -> int:
        """The largest rank the decomposition can keep (the dense layer's rank)."""

    @abc.abstractmethod
    def spectrum(self) -> np.ndarray:
        """Singular values (largest first) that rank selection looks at."""

    @abc.abstractmethod
    def cost(self, rank: int | None) -> Cost:
        """Params and MACs of the layer factorized at ``rank`` (``None``: the dense layer)."""

    @abc.abstractmethod
    def error(self, rank: int) -> float:
        """Relative error of the layer at ``rank``: ‖y − y_r‖ / ‖y‖ on calibration data when
        input statistics are known, else in weight space ‖W − W_r‖_F / ‖W‖_F."""

    @abc.abstractmethod
    def apply(self, model: ir.Model, rank: int) -> None:
        """Rewrite the node named ``self.name`` in ``model`` (the original or a copy) in place."""

    #: name of the value feeding the layer, whose second moment makes the layer data-aware, and
    #: the axis of its features (-1 for MatMul rows, 1 for NCHW channels)
    input_name: str | None = None
    input_axis: int = -1
    #: which statistic of that input the layer wants: "moment" (XᵀX) or "counts" (ids looked up)
    input_stat: str = "moment"
    #: what the factorization must reduce to pay (an embedding lookup has no MACs to save)
    saves: tuple[str, ...] = ("params", "macs")

    def candidate_ranks(self) -> list[int]:
        """Ranks a global budget tries for this layer: fractions of the full rank (each costs one
        sensitivity run; the driver drops those that do not pay before measuring)."""
        ranks = {max(1, round(f * self.full_rank)) for f in RANK_LADDER}
        return sorted((r for r in ranks if r < self.full_rank), reverse=True)

    def set_input_moment(self, moment: np.ndarray, rows: int | None = None) -> None:
        """Second moment ``XᵀX/rows`` of the layer's input (data-aware decompositions use it)."""

    def set_input_counts(self, counts: np.ndarray) -> None:
        """How often each id was looked up (layers with ``input_stat == "counts"``)."""


# A factorizer: (model, config) → layers it can rewrite.
Factorizer = Callable[[ir.Model, "LowRankConfig"], list[FactorizableLayer]]
FACTORIZERS: dict[str, Factorizer] = {}


def register_factorizer(name: str) -> Callable[[Factorizer], Factorizer]:
    def deco(fn: Factorizer) -> Factorizer:
        FACTORIZERS[name] = fn
        return fn

    return deco


@dataclasses.dataclass(frozen=True)
class LowRankConfig:
    """Settings of the low-rank pass.

    Attributes:
        policy: how ranks are chosen (``rank_selection.parse_policy``).
        layers: which factorizers run (``gemm``, ``conv``, ``tt``, ``embedding``).
        conv_method: ``tucker2``, ``cp`` or ``spatial`` (spatial SVD) for Conv layers.
        data_aware: whiten by input activations (needs calibration samples) where supported.
        max_layer_error: a layer whose relative error at the chosen rank exceeds this is left dense.
        min_params: layers with fewer weight parameters are left alone (not worth a node).
        min_saving: the factorized layer must need at most this fraction of the dense params/MACs.
        max_calib: calibration samples used for input statistics (data-aware SVD).
        max_sensitivity: calibration samples each sensitivity run of a global budget uses
            (one ORT pass over them per layer and candidate rank).
    """

    policy: RankPolicy
    layers: tuple[str, ...] = ("gemm", "conv")
    conv_method: str = "tucker2"
    data_aware: bool = True
    max_layer_error: float = 1.0
    min_params: int = 1024
    min_saving: float = 0.9
    max_calib: int = 512
    max_sensitivity: int = 64


def _spread(samples: list, count: int) -> list:
    """``count`` samples spread evenly over ``samples`` (calibration sets are often ordered by
    source, e.g. 20 views of one photo after another: the first ``count`` would be one photo)."""
    if len(samples) <= count:
        return samples
    idx = np.linspace(0, len(samples) - 1, count).round().astype(int)
    return [samples[i] for i in idx]


def calibration_probe(model: ir.Model, calib: Samples, kind: str) -> Callable[[Callable[[ir.Model], Any]], float]:
    """``probe(edit)``: the budget metric of a copy of ``model`` changed by ``edit`` (which rewrites
    the copy in place), against ``model``'s own outputs on ``calib`` (run once, here).

    ``kind`` ``"top1"``: the lowest top-1 agreement over classifier-like outputs (the mean cosine
    when no output is one); otherwise the lowest per-output mean cosine. Shared by the passes that
    allocate a budget by measured sensitivity (low rank, pruning).
    """
    from edgecomp.numerics import Tolerance, compare

    reference = activations.model_outputs(model, calib)
    names = [o.name for o in model.graph.outputs]

    def probe(edit: Callable[[ir.Model], Any]) -> float:
        trial = ir.serde.deserialize_model(ir.serde.serialize_model(model))
        edit(trial)
        return compare(names, reference, activations.model_outputs(trial, calib), Tolerance()).budget_metric(kind)

    return probe


class LowRank(ir.passes.InPlacePass):
    """Factorize layers by low-rank decomposition (lossy: checked against the accuracy budget)."""

    lossy = True

    def __init__(self, config: LowRankConfig, calib: Samples | None = None) -> None:
        super().__init__()
        unknown = [name for name in config.layers if name not in FACTORIZERS]
        if unknown:
            raise InputError(f"unknown low-rank layer kind {unknown[0]!r} (known: {', '.join(FACTORIZERS)})")
        if config.policy.is_global and not calib:
            raise InputError(f"--lowrank {config.policy}: a global budget needs calibration data (--calib)")
        self.config = config
        self.calib = _spread(list(calib or []), config.max_calib)

    # -- helpers ---------------------------------------------------------------------------------
    def _layers(self, model: ir.Model) -> list[FactorizableLayer]:
        found: list[FactorizableLayer] = []
        for kind in self.config.layers:
            found.extend(FACTORIZERS[kind](model, self.config))
        return found

    def _small(self, layer: FactorizableLayer) -> bool:
        return layer.cost(None).params < self.config.min_params

    def _pays(self, layer: FactorizableLayer, rank: int) -> bool:
        dense, low = layer.cost(None), layer.cost(rank)
        f = self.config.min_saving
        return all(getattr(low, k) <= f * getattr(dense, k) for k in layer.saves)

    def _ladder_ranks(self, layer: FactorizableLayer) -> list[int]:
        return [r for r in layer.candidate_ranks() if self._pays(layer, r)]

    # -- the pass --------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> StatsResult:
        # One BLAS thread: the SVDs here are many and mid-sized, and OpenBLAS's threads measured
        # 4x slower than one thread on a busy 2-core machine (0.4 s vs 0.09 s for 384x1536).
        with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
            return self._call(model)

    def _call(self, model: ir.Model) -> StatsResult:
        ir.passes.common.NameFixPass()(model)
        # Costs (MACs) need the shapes of every layer's input.
        ir.passes.common.ShapeInferencePass()(model)
        all_layers = self._layers(model)
        layers = [layer for layer in all_layers if not self._small(layer)]
        if self.config.data_aware and self.calib:
            self._set_input_statistics(model, layers)

        chosen: dict[str, int | None]
        global_stats: dict[str, Any] = {}
        if self.config.policy.is_global:
            chosen, global_stats = self._allocate(model, layers)
        else:
            chosen = {
                layer.name: self.config.policy.layer_rank(layer.name, layer.spectrum(), layer.full_rank)
                for layer in layers
            }

        records = []
        modified = False
        for layer in all_layers:
            rank = chosen.get(layer.name)
            record = self._record(layer, rank)
            if self._small(layer):
                record["decision"] = f"kept dense (below {self.config.min_params} params)"
            elif rank is None:
                record["decision"] = "kept dense (policy)"
            elif rank >= layer.full_rank or not self._pays(layer, rank):
                record["decision"] = "kept dense (does not pay)"
            elif record["error"] > self.config.max_layer_error:
                record["decision"] = f"kept dense (error {record['error']:.3g} > {self.config.max_layer_error:g})"
            else:
                layer.apply(model, rank)
                record["decision"] = "factorized"
                modified = True
            records.append(record)
        done = [r for r in records if r["decision"] == "factorized"]
        stats = {
            "policy": str(self.config.policy),
            "data_aware": bool(self.config.data_aware and self.calib),
            "layers_found": len(records),
            "layers_factorized": len(done),
            "layer_params_before": sum(r["params"][0] for r in records),
            "layer_params_after": sum(r["params"][1] if r["decision"] == "factorized" else r["params"][0] for r in records),
            "layer_macs_before": sum(r["macs"][0] for r in records),
            "layer_macs_after": sum(r["macs"][1] if r["decision"] == "factorized" else r["macs"][0] for r in records),
            **global_stats,
        }
        if modified:  # the dense weights of rewritten layers are now unused
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return StatsResult(model, modified, stats=stats, layers=records)

    def _set_input_statistics(self, model: ir.Model, layers: Sequence[FactorizableLayer]) -> None:
        """Give data-aware layers their calibration statistics (one ORT run for all of them)."""
        wanted = [(layer.input_name, layer.input_axis) for layer in layers if layer.input_name and layer.input_stat == "moment"]
        if wanted:
            moments = activations.second_moments(model, wanted, self.calib)
            for layer in layers:
                key = (layer.input_name, layer.input_axis)
                if layer.input_stat == "moment" and key in moments:
                    layer.set_input_moment(*moments[key])
        counted = [layer for layer in layers if layer.input_name and layer.input_stat == "counts"]
        if counted:
            ids = activations.collect(model, [layer.input_name for layer in counted], self.calib)
            for layer in counted:
                flat = np.concatenate([v.ravel() for v in ids[layer.input_name]]).astype(np.int64)
                size = layer.weight_shape[0]
                flat = np.where(flat < 0, flat + size, flat)  # Gather allows negative ids
                layer.set_input_counts(np.bincount(flat[(flat >= 0) & (flat < size)], minlength=size))

    def _record(self, layer: FactorizableLayer, rank: int | None) -> dict[str, Any]:
        s = layer.spectrum()
        dense = layer.cost(None)
        low = layer.cost(rank) if rank is not None and rank < layer.full_rank else dense
        return {
            "name": layer.name,
            "op": layer.op,
            "method": layer.method,
            "weight_shape": list(layer.weight_shape),
            "full_rank": int(layer.full_rank),
            "rank": None if rank is None else int(rank),
            "erank": round(effective_rank(s), 3),
            "params": [dense.params, low.params],
            "macs": [dense.macs, low.macs],
            "error": float(layer.error(rank)) if rank is not None and rank < layer.full_rank else 0.0,
            "spectrum": [float(v) for v in s[:512]],
        }

    def _allocate(self, model: ir.Model, layers: Sequence[FactorizableLayer]) -> tuple[dict[str, int | None], dict]:
        """Greedy allocation of a global budget by measured sensitivity (see rank_selection)."""
        budget = self.config.policy
        calib = _spread(self.calib, self.config.max_sensitivity)
        probe = calibration_probe(model, calib, budget.budget or "cosine")
        by_name = {layer.name: layer for layer in layers}

        def metric(ranks: dict[str, int]) -> float:
            return probe(lambda trial: [by_name[name].apply(trial, rank) for name, rank in ranks.items()])

        unit = "macs" if budget.budget == "flops" else "params"
        ladders: dict[str, list[tuple[int, float, float]]] = {}
        evaluations = 0
        for layer in layers:
            dense = getattr(layer.cost(None), unit)
            ladder = [(layer.full_rank, float(dense), 0.0)]
            for rank in self._ladder_ranks(layer):
                if layer.error(rank) > self.config.max_layer_error:
                    continue
                loss = 1.0 - metric({layer.name: rank})
                evaluations += 1
                ladder.append((rank, float(getattr(layer.cost(rank), unit)), loss))
            ladders[layer.name] = ladder
        # The budget is over the whole model's params/MACs in these layers plus the rest.
        dense_total = float(sum(getattr(layer.cost(None), unit) for layer in layers))
        if unit == "params":
            others = sum(
                v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None
            ) - sum(layer.cost(None).params for layer in layers)
            dense_total += max(0, others)
        ranks, moves = greedy_allocate(ladders, dense_total, budget, metric)
        final_metric = metric(ranks) if ranks else 1.0
        stats = {
            "budget": str(budget),
            "budget_unit": unit,
            "sensitivity_evaluations": evaluations,
            "greedy_moves": len(moves),
            "calibration_metric": round(final_metric, 6),
            "calibration_samples": len(calib),
        }
        return {layer.name: ranks.get(layer.name) for layer in layers}, stats
