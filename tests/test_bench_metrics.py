"""Benchmark metrics pinned on tiny synthetic cases."""

from __future__ import annotations

import numpy as np
import pytest

from edgecomp.bench import metrics


def test_accuracy_and_top1():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert metrics.accuracy(logits, np.array([1, 0, 0])) == pytest.approx(2 / 3)
    assert metrics.top1_agreement(logits, logits) == 1.0
    shuffled = logits[[1, 2, 0]]
    assert metrics.top1_agreement(logits, shuffled) < 1.0


def test_kl_is_zero_only_for_equal_distributions():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((5, 10))
    assert metrics.mean_kl(z, z) == pytest.approx(0.0, abs=1e-12)
    assert metrics.mean_kl(z, z + 3.0) == pytest.approx(0.0, abs=1e-12)  # softmax is shift-invariant
    assert metrics.mean_kl(z, 2 * z) > 0.01
    # Known value: KL([.5,.5] ‖ [.25,.75]) = .5 ln 2 + .5 ln(2/3)
    p, q = np.log([[0.5, 0.5]]), np.log([[0.25, 0.75]])
    assert metrics.mean_kl(p, q) == pytest.approx(0.5 * np.log(2) + 0.5 * np.log(2 / 3))


def test_cosines():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(metrics.cosines(a, a), [1.0, 1.0])
    np.testing.assert_allclose(metrics.cosines(a, 3 * a), [1.0, 1.0])
    np.testing.assert_allclose(metrics.cosines(a, np.array([[0.0, 1.0], [-1.0, -1.0]])), [0.0, -1.0], atol=1e-12)


def test_spearman():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert metrics.spearman(x, x**3) == pytest.approx(1.0)  # any monotone map
    assert metrics.spearman(x, -x) == pytest.approx(-1.0)
    assert metrics.spearman(x, np.array([2.0, 1.0, 4.0, 3.0, 5.0])) == pytest.approx(0.8)  # 1 - 6*4/(5*24)


def test_pairwise_spearman_of_embeddings():
    rng = np.random.default_rng(1)
    e = rng.standard_normal((20, 8))
    assert metrics.pairwise_spearman(e, e * 2) == pytest.approx(1.0)
    noisy = e + 0.5 * rng.standard_normal(e.shape)
    assert 0.3 < metrics.pairwise_spearman(e, noisy) < 1.0
