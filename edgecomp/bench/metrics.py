"""Accuracy metrics of the benchmark, each comparing a configuration with the fp32 model.

- classification with labels: accuracy;
- classification against fp32 logits: top-1 agreement, mean KL(p_fp32 ‖ p), max abs error;
- embeddings: cosine per sample (mean, min) and the Spearman correlation of all pairwise
  similarities (does the compressed model still rank sentence pairs the same way?).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "accuracy",
    "log_softmax",
    "top1_agreement",
    "mean_kl",
    "max_abs",
    "cosines",
    "spearman",
    "pairwise_spearman",
    "classification_metrics",
    "embedding_metrics",
]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows of ``logits`` [N, C] whose argmax is the label."""
    return float(np.mean(np.argmax(logits, axis=-1).reshape(-1) == np.asarray(labels).reshape(-1)))


def top1_agreement(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.mean(np.argmax(ref, axis=-1) == np.argmax(got, axis=-1)))


def log_softmax(z: np.ndarray) -> np.ndarray:
    """log of softmax over the last axis, in float64."""
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def mean_kl(ref_logits: np.ndarray, got_logits: np.ndarray) -> float:
    """Mean over rows of KL(softmax(ref) ‖ softmax(got)), in nats."""
    lp, lq = log_softmax(ref_logits), log_softmax(got_logits)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def max_abs(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64))))


def cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row (sample) of ``ref`` [N, D] with the same row of ``got``."""
    a = ref.reshape(len(ref), -1).astype(np.float64)
    b = got.reshape(len(got), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-30)


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    # Average the ranks of ties so the statistic is symmetric.
    vals, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    if len(vals) < len(x):
        sums = np.bincount(inverse, weights=ranks)
        ranks = (sums / counts)[inverse]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of two equally long vectors."""
    rx, ry = _ranks(np.asarray(x).ravel()), _ranks(np.asarray(y).ravel())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else 0.0


def pairwise_spearman(ref: np.ndarray, got: np.ndarray) -> float:
    """Spearman correlation of the pairwise cosine similarities of ``ref`` rows and ``got`` rows."""
    def sims(e: np.ndarray) -> np.ndarray:
        e = e.reshape(len(e), -1).astype(np.float64)
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-30)
        s = e @ e.T
        return s[np.triu_indices(len(e), k=1)]

    return spearman(sims(ref), sims(got))


def classification_metrics(logits: np.ndarray, ref_logits: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    """Top-1 agreement, mean KL(ref ‖ candidate) and max |Δlogit| against the fp32 logits (plus
    accuracy when labels are given). Arrays: [K, ..., classes]."""
    c = logits.reshape(len(logits), -1)
    r = ref_logits.reshape(len(ref_logits), -1)
    out = {
        "top1_agreement": top1_agreement(r, c),
        "mean_kl": mean_kl(r, c),
        "max_abs_error": max_abs(r, c),
        "samples": int(len(c)),
    }
    if labels is not None:
        out["accuracy"] = accuracy(c, labels)
        out["ref_accuracy"] = accuracy(r, labels)
    return out


def embedding_metrics(emb: np.ndarray, ref_emb: np.ndarray) -> dict[str, float]:
    """Cosine to the fp32 embeddings (mean, min) and the Spearman correlation of all pairwise
    similarities (candidate vs reference). Arrays: [K, ..., dim]."""
    cos = cosines(ref_emb, emb)
    out = {
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "max_abs_error": max_abs(ref_emb, emb),
        "samples": int(len(emb)),
    }
    if len(emb) > 2:
        out["pairwise_spearman"] = pairwise_spearman(ref_emb, emb)
    return out
