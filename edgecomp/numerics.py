"""Numerics against ONNX Runtime: reference runs and the comparison every stage is held to.

The reference is always ORT on the *original* model. A comparison reports, per output, the max
absolute error, the max error relative to the output's scale, the cosine similarity, and for
classifier-like outputs (``[N, C]`` floats) the top-1 agreement; :class:`Tolerance` says what passes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import numpy as np
import onnx

from edgecomp.errors import InputError, UnsupportedModelError

__all__ = ["DEFAULT_ACCURACY", "Tolerance", "OutputMetrics", "Comparison", "ort_session", "run_ort", "compare", "Samples"]

# A reference set: one feed dict per sample (each array has the model's exact input shape).
Samples = list[dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """What counts as "the same outputs".

    ``max_abs`` bounds ``max|got - ref|`` after scaling: the bound is ``atol + rtol * max|ref|``,
    so it means the same for logits of size 10 and of size 0.01. ``min_cosine`` is checked per
    sample (flattened); ``min_top1`` is the fraction of samples whose argmax agrees.
    """

    atol: float = 1e-4
    rtol: float = 1e-5
    min_cosine: float = 0.9999
    min_top1: float = 1.0

    def to_json(self) -> dict:
        return {k: _finite(v) for k, v in dataclasses.asdict(self).items()}


def _finite(x):
    """JSON has no infinity: an unbounded tolerance is written as null."""
    return None if isinstance(x, float) and math.isinf(x) else x


# How far lossy passes may take outputs from the original model unless the user says otherwise.
DEFAULT_ACCURACY = Tolerance(atol=math.inf, rtol=0.0, min_cosine=0.98, min_top1=0.0)


@dataclasses.dataclass
class OutputMetrics:
    name: str
    max_abs: float
    bound: float
    min_cosine: float
    mean_cosine: float
    top1: float | None  # None when the output is not classifier-like

    def failures(self, tol: Tolerance) -> list[str]:
        bad = []
        if not self.max_abs <= self.bound:  # also catches NaN
            bad.append(f"max abs error {self.max_abs:.3g} > {self.bound:.3g}")
        if not self.min_cosine >= tol.min_cosine:
            bad.append(f"cosine {self.min_cosine:.6f} < {tol.min_cosine}")
        if self.top1 is not None and not self.top1 >= tol.min_top1:
            bad.append(f"top-1 agreement {self.top1:.3f} < {tol.min_top1}")
        return bad


@dataclasses.dataclass
class Comparison:
    outputs: list[OutputMetrics]
    tolerance: Tolerance
    samples: int

    @property
    def failures(self) -> list[str]:
        return [f"{m.name}: {f}" for m in self.outputs for f in m.failures(self.tolerance)]

    @property
    def ok(self) -> bool:
        return not self.failures

    def budget_metric(self, kind: str) -> float:
        """One number for a budget: ``top1``: the lowest top-1 agreement over classifier-like
        outputs (the cosine rule when there is none); otherwise the lowest per-output mean cosine."""
        if kind == "top1":
            tops = [o.top1 for o in self.outputs if o.top1 is not None]
            if tops:
                return float(min(tops))
        return float(min(o.mean_cosine for o in self.outputs))

    def summary(self) -> str:
        parts = []
        for m in self.outputs:
            s = f"{m.name}: max|err| {m.max_abs:.2e}, cos {m.min_cosine:.6f}"
            if m.top1 is not None:
                s += f", top-1 {m.top1:.3f}"
            parts.append(s)
        return "; ".join(parts)

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "samples": self.samples,
            "tolerance": self.tolerance.to_json(),
            "outputs": [{k: _finite(v) for k, v in dataclasses.asdict(m).items()} for m in self.outputs],
            "failures": self.failures,
        }


def ort_session(model: onnx.ModelProto | bytes | str | os.PathLike, threads: int = 1):
    """An ORT CPU session on a model in memory or a file (errors become one-line messages).

    A quantized (QDQ) model given in memory runs *as written*, with graph optimizations off: ORT
    otherwise fuses DequantizeLinear → Conv → QuantizeLinear into int8 kernels that round
    differently from the graph's ONNX semantics (measured on MobileNetV2, top-1 agreement with
    fp32: 0.773 as written, 0.723 fused), and the graph's semantics is what a compiler must
    reproduce. Weight-only int8 (DequantizeLinear → MatMul) is fused too, into kernels that quantize
    the activations on the fly (MiniLM: cosine 0.9997 instead of float-exact). Files (e.g. ORT's
    own int8 baseline in the benchmark) run fully optimized.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if isinstance(model, onnx.ModelProto):
        data = model.SerializeToString()
        if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    else:
        data = model if isinstance(model, bytes) else os.fspath(model)
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as err:
        msg = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise UnsupportedModelError(f"ONNX Runtime cannot load the model: {msg}") from None


def run_ort(model: onnx.ModelProto | bytes, samples: Samples, output_names: Sequence[str] | None = None):
    """Run every sample through ORT; returns one list of output arrays per sample."""
    sess = ort_session(model)
    names = list(output_names) if output_names else [o.name for o in sess.get_outputs()]
    results = []
    for feed in samples:
        try:
            results.append(sess.run(names, feed))
        except Exception as err:
            msg = str(err).strip().splitlines()[0][:300]
            raise InputError(f"ONNX Runtime failed on the reference inputs: {msg}") from None
    return results


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def _is_classifier(ref: np.ndarray) -> bool:
    return ref.dtype.kind == "f" and ref.ndim == 2 and ref.shape[1] > 1


def compare(
    names: Sequence[str],
    reference: list[list[np.ndarray]],
    got: list[list[np.ndarray]],
    tol: Tolerance,
) -> Comparison:
    """Compare per-sample outputs ``got`` with ``reference`` (same nesting: sample → outputs)."""
    if len(reference) != len(got):
        raise ValueError(f"{len(reference)} reference samples but {len(got)} results")
    metrics = []
    for j, name in enumerate(names):
        refs = [np.asarray(r[j]) for r in reference]
        outs = [np.asarray(g[j]) for g in got]
        for r, o in zip(refs, outs):
            if r.shape != o.shape:
                raise UnsupportedModelError(f"output {name!r}: shape {o.shape}, expected {r.shape}")
        max_abs = max(
            (float(np.max(np.abs(o.astype(np.float64) - r.astype(np.float64)))) if r.size else 0.0)
            for r, o in zip(refs, outs)
        )
        scale = max((float(np.max(np.abs(r.astype(np.float64)))) if r.size else 0.0) for r in refs)
        cos = [_cosine(r, o) for r, o in zip(refs, outs)]
        top1 = None
        if all(_is_classifier(r) for r in refs):
            agree = [np.argmax(r, axis=1) == np.argmax(o, axis=1) for r, o in zip(refs, outs)]
            top1 = float(np.mean(np.concatenate(agree)))
        if any(math.isnan(c) for c in cos):
            cos = [float("nan")]
        metrics.append(
            OutputMetrics(
                name=name,
                max_abs=max_abs,
                bound=tol.atol + tol.rtol * scale,
                min_cosine=float(min(cos)),
                mean_cosine=float(np.mean(cos)),
                top1=top1,
            )
        )
    return Comparison(metrics, tol, len(reference))
