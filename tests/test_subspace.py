"""DLDR subspace training (edgecomp.train.subspace): the PCA finds a trajectory's span, P-SGD stays in
``anchor + span(P)``, P-SGD and P-BFGS lower the loss on digits, and a seed fixes the result."""

from __future__ import annotations

import pytest

from helpers import need_torch  # noqa: E402

torch = need_torch()
pytest.importorskip("sklearn")

from torch.nn import functional as F  # noqa: E402

from edgecomp.errors import InputError  # noqa: E402
from edgecomp.train.common import TrainLog, seed_everything  # noqa: E402
from edgecomp.train.data import digits_model, load_digits_splits  # noqa: E402
from edgecomp.train.subspace import (  # noqa: E402
    dldr_subspace,
    flat_params,
    pbfgs,
    psgd,
    sample_trajectory,
)

torch.set_num_threads(1)


def loss_fn(net, batch):
    return F.cross_entropy(net(batch[0]), batch[1])


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits_splits()["train"]
    return torch.from_numpy(x[:384]), torch.from_numpy(y[:384])


def quiet(name: str = "t") -> TrainLog:
    return TrainLog(name=name, enabled=False)


def full_loss(model, data) -> float:
    with torch.no_grad():
        return float(loss_fn(model, data))


def assert_in_span(model, P, anchor):
    """``w − anchor ∈ span(P)`` up to rounding ``w`` to float32 (checked in float64 so the check's own
    38k-term sums add no error): the residual must be below 1e-6·‖w‖ (float32 eps is 6e-8)."""
    w = flat_params(model).double()
    P64 = P.double()
    delta = w - anchor.double()
    assert float(delta.norm()) > 1e-3  # it moved
    residual = delta - P64 @ (P64.T @ delta)
    assert float(residual.norm()) <= 1e-6 * float(w.norm())


def test_pca_recovers_span_of_synthetic_trajectory():
    gen = torch.Generator().manual_seed(0)
    n, k, t = 500, 4, 30
    basis, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    centre = torch.randn(n, generator=gen, dtype=torch.float64)
    coeffs = torch.randn(t, k, generator=gen, dtype=torch.float64) * torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64)
    snaps = centre + coeffs @ basis.T
    sub = dldr_subspace(snaps, k)
    assert sub.P.shape == (n, k)
    assert torch.allclose(sub.P.T @ sub.P, torch.eye(k, dtype=torch.float64), atol=1e-10)
    # every true direction lies in span(P), and the mean is the snapshots' mean
    assert float((basis - sub.P @ (sub.P.T @ basis)).norm()) < 1e-8
    assert torch.allclose(sub.mean, snaps.mean(0))
    assert abs(float(sub.explained.sum()) - 1.0) < 1e-10
    assert bool((sub.explained[:-1] >= sub.explained[1:]).all())
    # same directions and variance ratios as scikit-learn's exact PCA
    from sklearn.decomposition import PCA

    ref = PCA(k, svd_solver="full").fit(snaps.numpy())
    assert torch.allclose(sub.explained, torch.from_numpy(ref.explained_variance_ratio_), atol=1e-10)
    assert torch.allclose(sub.P.abs(), torch.from_numpy(ref.components_.T).abs(), atol=1e-8)
    # fewer directions than the trajectory has: the top ones, in order of variance
    top2 = dldr_subspace(snaps, 2)
    assert torch.allclose(top2.P.abs(), sub.P[:, :2].abs(), atol=1e-8)
    with pytest.raises(InputError):
        dldr_subspace(snaps, t)  # centred t snapshots have rank <= t - 1
    with pytest.raises(InputError):
        dldr_subspace(snaps, k + 1)  # only k directions exist


def test_psgd_stays_in_anchor_plus_span(digits):
    seed_everything(0)
    model = digits_model()
    anchor = flat_params(model)
    gen = torch.Generator().manual_seed(1)
    P, _ = torch.linalg.qr(torch.randn(anchor.numel(), 6, generator=gen))
    psgd(model, P, anchor, loss_fn, digits, epochs=2, lr=0.05, seed=0, log=quiet())
    assert_in_span(model, P, anchor)


def tiny_pipeline(digits, method: str, seed: int = 0):
    """DLDR on a 2-epoch Adam run (24 steps, 9 snapshots), then 2 epochs in a 6-dim subspace that
    continues from the last snapshot."""
    seed_everything(seed)
    model = digits_model()
    traj = sample_trajectory(model, loss_fn, digits, epochs=2, snapshots=9, lr=3e-3, seed=seed, log=quiet())
    assert traj.weights.shape == (9, sum(p.numel() for p in model.parameters()))
    assert traj.steps == [0, 3, 6, 9, 12, 15, 18, 21, 24]  # 384 samples / batch 32 = 12 steps an epoch
    assert torch.equal(traj.last, flat_params(model))
    sub = dldr_subspace(traj, 6)
    anchor = traj.last
    start = full_loss(model, digits)
    if method == "psgd":
        records = psgd(model, sub.P, anchor, loss_fn, digits, epochs=2, lr=0.03, seed=seed, log=quiet())
    else:
        records = pbfgs(model, sub.P, anchor, loss_fn, digits, epochs=2, seed=seed, log=quiet())
    return model, start, full_loss(model, digits), records, sub.P, anchor


def test_psgd_reduces_training_loss(digits):
    model, start, end, records, P, anchor = tiny_pipeline(digits, "psgd")
    assert len(records) == 2 and all("loss" in r and "seconds" in r for r in records)
    assert end < 0.8 * start
    assert_in_span(model, P, anchor)


def test_pbfgs_reduces_training_loss_and_stays_in_span(digits):
    model, start, end, records, P, anchor = tiny_pipeline(digits, "pbfgs")
    assert end < 0.8 * start
    assert records[-1]["line_search_trials"] >= 1
    assert_in_span(model, P, anchor)


def test_same_seed_same_result(digits):
    for method in ("psgd", "pbfgs"):
        a, _, la, ra, _, _ = tiny_pipeline(digits, method, seed=3)
        b, _, lb, rb, _, _ = tiny_pipeline(digits, method, seed=3)
        assert torch.equal(flat_params(a), flat_params(b))
        assert la == lb and [r["loss"] for r in ra] == [r["loss"] for r in rb]
