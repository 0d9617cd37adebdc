"""Tests of pgd_deploy.distill.masks.pgw_mask, the prediction-guided weighting mask: against hand
computations and a numpy reference fit, its jitter, the strict inside test, the top-k across GTs
and levels, swap_xy, dtypes and bad shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _mask_reference import gaussian_weights

from pgd_deploy.distill import background_mask, pgw_mask, quality_score


def test_pgw_hand_computed() -> None:
    # 7 locations; the 5 best for the single GT are the corners and the centre of a square.
    centers = torch.tensor([[0.0, 0], [4, 0], [0, 4], [4, 4], [2, 2], [8, 8], [6, 6]])
    quality = torch.tensor([[0.9], [0.8], [0.7], [0.6], [0.5], [0.1], [0.2]])
    gt = torch.tensor([[-1.0, -1, 9, 9]])  # contains every centre
    mask = pgw_mask(quality, centers, gt, k=5, jitter=0.0)
    # By hand: mean (2, 2); Sigma = diag(16/5, 16/5) (biased: / K); corners have
    # mahalanobis^2 = (4 + 4) / (16/5) = 5/2, the centre 0. Sum = 10 = K * 2.
    corner = math.exp(-0.5 * 5 / 2)
    expected = torch.tensor([corner, corner, corner, corner, 1.0, 0.0, 0.0])
    torch.testing.assert_close(mask, expected, rtol=1e-6, atol=1e-7)


def test_pgw_matches_numpy_reference_on_three_points() -> None:
    # Any 3 non-collinear points: every mahalanobis^2 equals 2 (K = d + 1).
    centers = torch.tensor([[0.0, 0], [4, 0], [0, 4], [8, 8]])
    quality = torch.tensor([[0.9], [0.8], [0.7], [0.1]])
    gt = torch.tensor([[-1.0, -1, 9, 9]])
    mask = pgw_mask(quality, centers, gt, k=3, jitter=0.0)
    ref = gaussian_weights(centers[:3].double().numpy())
    np.testing.assert_allclose(ref, math.exp(-1.0), rtol=1e-12)
    np.testing.assert_allclose(mask.numpy(), [*ref, 0.0], rtol=1e-5)


def test_pgw_points_on_a_line_are_finite_with_jitter() -> None:
    # Three collinear points: singular covariance without jitter.
    centers = torch.tensor([[4.0, 4], [12, 4], [20, 4], [4, 12]])
    quality = torch.tensor([[0.9], [0.8], [0.7], [0.1]])
    gt = torch.tensor([[0.0, 0, 32, 32]])
    exact = pgw_mask(quality, centers, gt, k=3, jitter=0.0)
    # With jitter = 0 the y spread is exactly 0 and adj / (det + eps) leaves only the x term,
    # whose adjugate entry is var_y = 0: every selected point gets weight 1.
    torch.testing.assert_close(exact, torch.tensor([1.0, 1.0, 1.0, 0.0]))
    gen = torch.Generator().manual_seed(0)
    jittered = pgw_mask(quality, centers, gt, k=3, jitter=0.05, generator=gen)
    assert torch.isfinite(jittered).all()
    assert ((jittered[:3] > 0) & (jittered[:3] <= 1)).all()
    assert jittered[3] == 0


def test_pgw_jitter_reproducible_and_small() -> None:
    torch.manual_seed(1)
    centers = torch.rand(50, 2) * 100
    quality = torch.rand(50, 3)
    gt = torch.tensor([[0.0, 0, 100, 100], [10, 10, 60, 60], [40, 0, 100, 50]])
    a = pgw_mask(quality, centers, gt, 10, 0.05, torch.Generator().manual_seed(3))
    b = pgw_mask(quality, centers, gt, 10, 0.05, torch.Generator().manual_seed(3))
    c = pgw_mask(quality, centers, gt, 10, 0.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    torch.testing.assert_close(a, c, rtol=0, atol=0.02)  # 0.05 px on a ~30 px spread
    torch.testing.assert_close(c, pgw_mask(quality, centers, gt, 10, 0.0), rtol=0, atol=0)


def test_pgw_jitter_moves_the_fit_not_the_weighted_points() -> None:
    """With jitter the Gaussian is fitted to the jittered centres and evaluated at the
    un-jittered ones. Reference: numpy, given the same noise (the generator's one uniform draw
    of shape [K, G, 2], points in top-k order)."""
    centers = torch.tensor([[0.0, 0], [4, 0], [0, 4], [4, 4], [2, 2], [8, 8], [6, 6]])
    quality = torch.tensor([[0.9], [0.8], [0.7], [0.6], [0.5], [0.1], [0.2]])
    gt = torch.tensor([[-1.0, -1, 9, 9]])
    jitter = 0.5
    mask = pgw_mask(quality, centers, gt, 5, jitter, torch.Generator().manual_seed(7))
    noise = torch.rand((5, 1, 2), generator=torch.Generator().manual_seed(7))[:, 0].double()
    points = centers[:5].double().numpy()  # the top 5, in quality order
    fit = points + (noise.numpy() * 2 - 1) * jitter
    mean = fit.mean(axis=0)
    inv = np.linalg.inv(np.cov(fit.T, bias=True))
    diff = points - mean
    expected = np.exp(-0.5 * np.einsum("ki,ij,kj->k", diff, inv, diff))
    np.testing.assert_allclose(mask.numpy(), [*expected, 0.0, 0.0], rtol=1e-5, atol=1e-7)
    # the jitter is not negligible here: the weights differ from the jitter-free fit
    assert np.abs(expected - gaussian_weights(points)).max() > 0.01


def test_pgw_in_box_filter_after_fit() -> None:
    # Same square as the hand-computed test, but the GT leaves out the right column (x = 4):
    # those two points still shape the fit, then get weight 0.
    centers = torch.tensor([[0.0, 0], [4, 0], [0, 4], [4, 4], [2, 2], [8, 8]])
    quality = torch.tensor([[0.9], [0.8], [0.7], [0.6], [0.5], [0.1]])
    gt = torch.tensor([[-1.0, -1, 3, 5]])
    mask = pgw_mask(quality, centers, gt, k=5, jitter=0.0)
    corner = math.exp(-0.5 * 5 / 2)
    expected = torch.tensor([corner, 0.0, corner, 0.0, 1.0, 0.0])
    torch.testing.assert_close(mask, expected, rtol=1e-6, atol=1e-7)


def test_pgw_strict_inside_border_is_out() -> None:
    centers = torch.tensor([[0.0, 0], [4, 0], [0, 4]])
    quality = torch.tensor([[0.9], [0.8], [0.7]])
    gt = torch.tensor([[0.0, -1, 9, 9]])  # x1 = 0: the points with x = 0 sit on the border
    mask = pgw_mask(quality, centers, gt, k=3, jitter=0.0)
    assert mask[0] == 0 and mask[2] == 0 and mask[1] > 0


def test_pgw_gt_with_no_location_inside() -> None:
    centers = torch.tensor([[4.0, 4], [12, 4], [4, 12], [12, 12]])
    quality = torch.tensor([[0.9], [0.1], [0.5], [0.3]])
    gt = torch.tensor([[5.0, 5, 11, 11]])  # between the four centres
    mask = pgw_mask(quality, centers, gt, k=3, jitter=0.0)
    assert torch.equal(mask, torch.zeros(4))


def test_pgw_two_overlapping_gts_share_a_location() -> None:
    # Location 3 is in both GTs' top-4 and inside both boxes: it takes the max of two weights.
    centers = torch.tensor(
        [[0.0, 0], [8, 0], [0, 8], [6, 6], [14, 2], [10, 12], [16, 10], [30, 30]]
    )
    quality = torch.tensor(
        [
            [0.9, 0.0],
            [0.8, 0.1],
            [0.7, 0.2],
            [0.6, 0.95],
            [0.1, 0.9],
            [0.0, 0.85],
            [0.1, 0.8],
            [0.05, 0.05],
        ]
    )
    gt = torch.tensor([[-1.0, -1, 9, 9], [5.0, 1, 17, 13]])
    mask = pgw_mask(quality, centers, gt, k=4, jitter=0.0)
    w0 = gaussian_weights(centers[[0, 1, 2, 3]].double().numpy())  # GT0: locations 0-3
    w1 = gaussian_weights(centers[[3, 4, 5, 6]].double().numpy())  # GT1: locations 3-6
    assert abs(w0[3] - w1[0]) > 0.05  # the max is a real choice
    expected = np.array([w0[0], w0[1], w0[2], max(w0[3], w1[0]), w1[1], w1[2], w1[3], 0.0])
    np.testing.assert_allclose(mask.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_pgw_exactly_k_nonzeros_and_range() -> None:
    torch.manual_seed(0)
    centers = torch.rand(200, 2) * 64
    quality = torch.rand(200, 1)
    gt = torch.tensor([[-10.0, -10, 100, 100]])  # covers everything
    gen = torch.Generator().manual_seed(0)
    mask = pgw_mask(quality, centers, gt, k=30, generator=gen)
    nonzero = mask[mask != 0]
    assert nonzero.numel() == 30
    assert ((nonzero > 0) & (nonzero <= 1)).all()
    top = quality[:, 0].topk(30).indices
    assert set(torch.nonzero(mask).flatten().tolist()) == set(top.tolist())
    # The MLE fit of the same points: mean squared Mahalanobis distance is 2 (jitter aside).
    exact = pgw_mask(quality, centers, gt, k=30, jitter=0.0)
    assert (-2 * exact[exact != 0].log()).mean().item() == pytest.approx(2.0, rel=1e-4)


def test_pgw_gt_order_invariance() -> None:
    torch.manual_seed(2)
    centers = torch.rand(120, 2) * 80
    quality = torch.rand(120, 4)
    gt = torch.tensor([[0.0, 0, 40, 40], [20, 20, 80, 80], [10, 30, 70, 60], [0, 0, 80, 80]])
    perm = torch.tensor([2, 0, 3, 1])
    a = pgw_mask(quality, centers, gt, k=12, jitter=0.0)
    b = pgw_mask(quality[:, perm], centers, gt[perm], k=12, jitter=0.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a > 0).sum() > 12


def test_pgw_no_gt_gives_zeros() -> None:
    mask = pgw_mask(torch.zeros(7, 0), torch.rand(7, 2), torch.zeros(0, 4), k=30)
    assert torch.equal(mask, torch.zeros(7))
    # An empty image may carry its boxes as any empty tensor.
    q = quality_score(torch.randn(7, 3), torch.rand(7, 4), torch.zeros(0), torch.zeros(0), 0.8)
    assert q.shape == (7, 0)
    assert torch.equal(pgw_mask(q, torch.rand(7, 2), torch.zeros(0), k=3), torch.zeros(7))
    assert torch.equal(background_mask(torch.rand(7, 2), torch.zeros(0)), torch.ones(7))


def test_pgw_k_larger_than_a_is_clamped() -> None:
    centers = torch.tensor([[0.0, 0], [4, 0], [0, 4]])
    quality = torch.tensor([[0.9], [0.8], [0.7]])
    gt = torch.tensor([[-1.0, -1, 9, 9]])
    torch.testing.assert_close(
        pgw_mask(quality, centers, gt, k=30, jitter=0.0),
        pgw_mask(quality, centers, gt, k=3, jitter=0.0),
    )


def test_pgw_float64_and_no_grad() -> None:
    torch.manual_seed(3)
    centers = torch.rand(40, 2, dtype=torch.float64) * 50
    quality = torch.rand(40, 2, dtype=torch.float64, requires_grad=True)
    gt = torch.tensor([[0.0, 0, 30, 50], [20, 0, 50, 50]], dtype=torch.float64)
    mask64 = pgw_mask(quality, centers, gt, k=8, jitter=0.0)
    assert mask64.dtype == torch.float64 and not mask64.requires_grad
    mask32 = pgw_mask(quality.detach().float(), centers.float(), gt.float(), k=8, jitter=0.0)
    torch.testing.assert_close(mask64.float(), mask32, rtol=1e-4, atol=1e-6)


def test_pgw_topk_joint_across_levels() -> None:
    # "P3" has 4 locations, "P4" 2; the best 2 for this GT are both on P4.
    centers = torch.tensor([[4.0, 4], [12, 4], [4, 12], [12, 12], [8, 8], [24, 8]])
    quality = torch.tensor([[0.1], [0.2], [0.3], [0.2], [0.9], [0.8]])
    gt = torch.tensor([[0.0, 0, 32, 32]])
    mask = pgw_mask(quality, centers, gt, k=2, jitter=0.0)
    assert torch.nonzero(mask).flatten().tolist() == [4, 5]


def test_pgw_swap_xy_reproduces_official_transpose() -> None:
    # (x=5, y=50) is inside [0, 40, 10, 60]; its transpose (50, 5) is not.
    centers = torch.tensor([[5.0, 50], [6, 52], [4, 55]])
    quality = torch.tensor([[0.9], [0.8], [0.7]])
    gt = torch.tensor([[0.0, 40, 10, 60]])
    assert (pgw_mask(quality, centers, gt, k=3, jitter=0.0) > 0).all()
    assert (pgw_mask(quality, centers, gt, k=3, jitter=0.0, swap_xy=True) == 0).all()
    gt_t = torch.tensor([[40.0, 0, 60, 10]])  # the transposed box catches the transposed points
    assert (pgw_mask(quality, centers, gt_t, k=3, jitter=0.0, swap_xy=True) > 0).all()


@pytest.mark.parametrize(
    ("quality", "centers", "gt", "k"),
    [
        (torch.zeros(4), torch.zeros(4, 2), torch.zeros(1, 4), 2),
        (torch.zeros(4, 1), torch.zeros(3, 2), torch.zeros(1, 4), 2),
        (torch.zeros(4, 1), torch.zeros(4, 3), torch.zeros(1, 4), 2),
        (torch.zeros(4, 1), torch.zeros(4, 2), torch.zeros(2, 4), 2),
        (torch.zeros(4, 1), torch.zeros(4, 2), torch.zeros(1, 4), 0),
    ],
)
def test_pgw_bad_shapes(quality, centers, gt, k) -> None:
    with pytest.raises(ValueError):
        pgw_mask(quality, centers, gt, k)
