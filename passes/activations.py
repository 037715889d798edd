"""Activations of inner values on calibration data, collected with ONNX Runtime.

Data-aware passes (whitened SVD, sensitivity analysis) need what flows into a layer, not only its
weights. The model is serialized with the wanted values added as graph outputs and run in memory;
nothing touches the disk.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
import onnx_ir as ir

from edgecomp.numerics import Samples, run_ort

__all__ = ["collect", "second_moments", "model_outputs"]


def collect(model: ir.Model, names: Sequence[str], samples: Samples) -> dict[str, list[np.ndarray]]:
    """Values named ``names`` (per sample) when ``model`` runs on ``samples`` (graph inputs are
    taken from the samples themselves)."""
    fed = [n for n in names if samples and n in samples[0]]
    inner = [n for n in names if n not in fed]
    out = {n: [s[n] for s in samples] for n in fed}
    if inner:
        out.update(_run_with_outputs(model, inner, samples))
    return out


def _run_with_outputs(model: ir.Model, names: Sequence[str], samples: Samples) -> dict[str, list[np.ndarray]]:
    proto = ir.serde.serialize_model(model)
    have = {o.name for o in proto.graph.output}
    for name in names:
        if name not in have:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    results = run_ort(proto, samples, list(names))
    return {name: [r[i] for r in results] for i, name in enumerate(names)}


def second_moments(
    model: ir.Model, wanted: Sequence[tuple[str, int]], samples: Samples
) -> dict[tuple[str, int], tuple[np.ndarray, int]]:
    """For each ``(value name, feature axis)``: ``(XᵀX / rows, rows)`` in float64, where the rows
    of ``X`` are every position along the other axes (tokens for ``-1``, pixels for NCHW's ``1``)."""
    wanted = list(dict.fromkeys(wanted))
    values = collect(model, list(dict.fromkeys(name for name, _ in wanted)), samples)
    moments: dict[tuple[str, int], tuple[np.ndarray, int]] = {}
    for name, axis in wanted:
        rows = np.concatenate(
            [np.moveaxis(v, axis, -1).reshape(-1, v.shape[axis]) for v in values[name]]
        ).astype(np.float64)
        moments[(name, axis)] = (rows.T @ rows / max(1, rows.shape[0]), int(rows.shape[0]))
    return moments


def model_outputs(model: ir.Model, samples: Samples) -> list[list[np.ndarray]]:
    """The model's own outputs on ``samples`` (per sample, in graph output order)."""
    proto = ir.serde.serialize_model(model)
    return run_ort(proto, samples, [o.name for o in proto.graph.output])
