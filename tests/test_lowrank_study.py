"""The rank-policy study's comparison at matched compression ratios."""

from __future__ import annotations

import numpy as np
import pytest

from edgecomp.bench.lowrank_study import StudyPoint, at_ratio, common_ratios, matched_table, run_study


def _pt(family, ratio, metric, aware=False):
    return StudyPoint(family, f"{family}:x", aware, int(ratio * 1000), ratio, ratio, 1, metric, 0.0)


def test_at_ratio_interpolates_a_monotone_curve():
    pts = [_pt("erank", 0.2, 0.5), _pt("erank", 0.4, 0.9), _pt("erank", 0.6, 0.8), _pt("erank", 1.0, 1.0)]
    assert at_ratio(pts, 0.3) == pytest.approx(0.7)
    # The dip at 0.6 is lifted to the best reachable with fewer params (0.9).
    assert at_ratio(pts, 0.6) == pytest.approx(0.9)
    assert at_ratio(pts, 0.1) is None and at_ratio(pts, 1.0) == pytest.approx(1.0)


def test_matched_table_names_the_winner_and_ties():
    pts = [_pt("erank", 0.2, 0.6), _pt("erank", 0.8, 1.0), _pt("l1", 0.2, 0.4), _pt("l1", 0.8, 1.0)]
    rows = matched_table(pts, [0.5, 0.8])
    assert rows[0]["best"] == "erank" and rows[0]["erank"] == pytest.approx(0.8)
    assert rows[1]["best"] == "tie"
    assert common_ratios(pts, count=2) == pytest.approx([0.317, 0.504], abs=1e-3)


def test_run_study_on_a_tiny_mlp():
    """End to end on a 2-layer MLP: each point really factorizes and is really scored."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((64, 64)) * np.logspace(0, -3, 64)).astype(np.float32)  # decaying spectrum
    w2 = rng.standard_normal((64, 64)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    samples = [{"x": rng.standard_normal((4, 64)).astype(np.float32)} for _ in range(4)]
    ref = [(s["x"] @ w1 @ w2) for s in samples]

    def score(outputs):
        return float(np.mean([np.dot(o[0].ravel(), r.ravel()) / np.linalg.norm(o[0]) / np.linalg.norm(r)
                              for o, r in zip(outputs, ref)]))

    points = run_study(model, samples, score, samples, layers=("gemm",), families=("energy",), data_aware=(False,))
    assert len(points) == 12
    # Lower energy keeps fewer params, and the full-energy points keep (nearly) all the accuracy.
    by_policy = {p.policy: p for p in points}
    assert by_policy["energy:0.5"].params_ratio < by_policy["energy:0.995"].params_ratio
    assert by_policy["energy:0.5"].metric < by_policy["energy:0.995"].metric <= 1.0 + 1e-6
