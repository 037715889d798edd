"""The comparison every stage is held to."""

from __future__ import annotations

import numpy as np

from edgecomp.numerics import Tolerance, compare


def _cmp(ref, got, tol=Tolerance()):
    return compare(["out"], [[r] for r in ref], [[g] for g in got], tol)


def test_identical_outputs_pass():
    ref = [np.array([[1.0, 2.0, 3.0]], np.float32)] * 2
    c = _cmp(ref, ref)
    assert c.ok and c.outputs[0].max_abs == 0 and c.outputs[0].top1 == 1.0


def test_tolerance_scales_with_output_magnitude():
    ref = [np.array([[1000.0, 2000.0]], np.float32)]
    got = [ref[0] + 0.005]
    assert not _cmp(ref, got, Tolerance(atol=1e-4, rtol=0)).ok
    assert _cmp(ref, got, Tolerance(atol=1e-4, rtol=1e-5)).ok  # bound 1e-4 + 0.02


def test_top1_flip_fails_even_when_errors_are_small():
    ref = [np.array([[1.0, 1.00001]], np.float32)]
    got = [np.array([[1.00001, 1.0]], np.float32)]
    c = _cmp(ref, got, Tolerance(atol=1e-3, min_cosine=0.99))
    assert c.outputs[0].top1 == 0.0
    assert c.failures == ["out: top-1 agreement 0.000 < 1.0"]


def test_nan_output_fails():
    ref = [np.ones((1, 4), np.float32)]
    got = [np.array([[1, np.nan, 1, 1]], np.float32)]
    c = _cmp(ref, got, Tolerance(atol=10, min_cosine=-1, min_top1=0))
    assert not c.ok


def test_non_classifier_outputs_have_no_top1():
    ref = [np.ones((2, 3, 4), np.float32)]
    assert _cmp(ref, ref).outputs[0].top1 is None
