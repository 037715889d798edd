"""The survey's finding, tested: which rank-selection rule keeps the most accuracy per parameter?

For one model, every policy family (effective rank × scale, energy fraction, l1 fraction) is swept
over a ladder of settings, with and without data-aware (whitened) SVD. Each point is the low-rank
pass applied to the cleaned model and scored on held-out evaluation data with ONNX Runtime (the
compiled code reproduces ORT, which the build verifies separately). Curves of metric against
parameters kept are then compared at matched compression ratios by interpolation.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from edgecomp.numerics import Samples, run_ort
from edgecomp.passes import make_passes
from edgecomp.passes.base import count_params
from edgecomp.passes.lowrank import LowRank, LowRankConfig
from edgecomp.passes.rank_selection import parse_policy

__all__ = ["SWEEPS", "StudyPoint", "run_study", "at_ratio", "common_ratios", "matched_table", "study_figure"]

log = logging.getLogger(__name__)

SWEEPS: dict[str, Sequence[str]] = {
    "erank": [f"erank:{s}" for s in (0.25, 0.4, 0.55, 0.7, 0.85, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)],
    "energy": [f"energy:{f}" for f in (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999)],
    "l1": [f"l1:{f}" for f in (0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99)],
}


@dataclasses.dataclass
class StudyPoint:
    family: str
    policy: str
    data_aware: bool
    params: int  # whole model
    params_ratio: float  # params / dense params (whole model)
    layer_params_ratio: float  # within the factorizable layers
    layers_factorized: int
    metric: float
    seconds: float


def _clean(model: onnx.ModelProto) -> ir.Model:
    irm = ir.serde.deserialize_model(model)
    for _, p in make_passes("shape,fold,dce,shape"):
        irm = p(irm).model
    return irm


def run_study(
    model: onnx.ModelProto,
    eval_samples: Samples,
    score: Callable[[list[list[np.ndarray]]], float],
    calib_samples: Samples | None,
    layers: tuple[str, ...] = ("gemm", "conv"),
    families: Sequence[str] = ("erank", "energy", "l1"),
    data_aware: Sequence[bool] = (False, True),
    conv_method: str = "tucker2",
    progress: Callable[[str], None] | None = None,
) -> list[StudyPoint]:
    """Score every policy of ``families`` on ``model`` (static input shapes)."""
    base = _clean(model)
    dense = count_params(base)[0]
    points: list[StudyPoint] = []
    out_names = [o.name for o in base.graph.outputs]
    for aware in data_aware:
        for family in families:
            for text in SWEEPS[family]:
                t0 = time.perf_counter()
                irm = ir.serde.deserialize_model(ir.serde.serialize_model(base))
                cfg = LowRankConfig(policy=parse_policy(text), layers=layers, conv_method=conv_method, data_aware=aware)
                result = LowRank(cfg, calib_samples if aware else None)(irm)
                proto = ir.serde.serialize_model(result.model)
                outputs = run_ort(proto, eval_samples, out_names)
                st = result.stats
                point = StudyPoint(
                    family=family,
                    policy=text,
                    data_aware=aware,
                    params=count_params(result.model)[0],
                    params_ratio=count_params(result.model)[0] / dense,
                    layer_params_ratio=st["layer_params_after"] / max(1, st["layer_params_before"]),
                    layers_factorized=st["layers_factorized"],
                    metric=float(score(outputs)),
                    seconds=time.perf_counter() - t0,
                )
                points.append(point)
                if progress:
                    progress(
                        f"{text:<14} {'data-aware' if aware else 'plain':<10} params {point.params_ratio:6.3f} "
                        f"metric {point.metric:.4f} ({point.seconds:.1f} s)"
                    )
    return points


def at_ratio(points: Sequence[StudyPoint], ratio: float) -> float | None:
    """Metric of a policy curve at a params ratio, by linear interpolation (None: out of range).

    The curve is made monotone first (the best metric reachable with at most that many params), so
    a noisy point cannot make a policy look better at a smaller size than at a larger one.
    """
    pts = sorted((p.params_ratio, p.metric) for p in points)
    if not pts or ratio < pts[0][0] - 1e-9 or ratio > pts[-1][0] + 1e-9:
        return None
    xs = np.array([x for x, _ in pts])
    ys = np.maximum.accumulate(np.array([y for _, y in pts]))
    return float(np.interp(ratio, xs, ys))


def common_ratios(points: Sequence[StudyPoint], count: int = 5) -> list[float]:
    """``count`` params ratios inside every curve's range (where all families can be compared),
    spaced geometrically: accuracy changes most at small ratios and saturates near 1."""
    lo, hi = 0.0, 1.0
    for aware in {p.data_aware for p in points}:
        for family in {p.family for p in points}:
            xs = [p.params_ratio for p in points if p.family == family and p.data_aware == aware]
            if xs:
                lo, hi = max(lo, min(xs)), min(hi, max(xs))
    if hi <= lo:
        return []
    return [round(float(r), 3) for r in np.geomspace(lo, hi, count + 2)[1:-1]]


def matched_table(points: Sequence[StudyPoint], ratios: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """Rows (data-aware, params ratio) → metric of each family at that ratio, and the winner.

    ``best`` names the family with the highest metric, ``tie`` when the top two are within 1e-6.
    """
    rows = []
    for aware in sorted({p.data_aware for p in points}):
        group = [p for p in points if p.data_aware == aware]
        for ratio in common_ratios(group) if ratios is None else ratios:
            row: dict[str, Any] = {"data_aware": aware, "params_ratio": ratio}
            for family in sorted({p.family for p in points}):
                row[family] = at_ratio([p for p in points if p.family == family and p.data_aware == aware], ratio)
            scored = sorted(
                ((v, k) for k, v in row.items() if k not in ("data_aware", "params_ratio") and v is not None),
                reverse=True,
            )
            if not scored:
                row["best"] = None
            elif len(scored) > 1 and scored[0][0] - scored[1][0] <= 1e-6:
                row["best"] = "tie"
            else:
                row["best"] = scored[0][1]
            rows.append(row)
    return rows


def study_figure(points: Sequence[StudyPoint], title: str, metric_name: str):
    """Metric vs params kept, one curve per policy family (solid: data-aware, dashed: plain)."""
    from edgecomp.figures import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {"erank": "tab:red", "energy": "tab:blue", "l1": "tab:green"}
    for family in sorted({p.family for p in points}):
        for aware in sorted({p.data_aware for p in points}):
            pts = sorted((p.params_ratio, p.metric) for p in points if p.family == family and p.data_aware == aware)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, color=colors.get(family), ls="-" if aware else "--",
                        label=f"{family} ({'data-aware' if aware else 'plain'})")
    ax.set_xlabel("parameters kept (fraction of the dense model)")
    ax.set_ylabel(metric_name)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
