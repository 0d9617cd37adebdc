"""Tests of pgd_deploy.distill.masks (and the batched mask_ops behind it): quality score, PGW
mask and background mask, per image and per batch, against hand computations and against a plain
loop rendering of docs/method.md §3 (`_reference_masks`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pgd_deploy.distill import background_mask, pgw_mask, quality_score
from pgd_deploy.distill.masks import batch_masks


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _gaussian_weights(points: np.ndarray) -> np.ndarray:
    """Reference PGW weights of K points [K, 2] (no jitter): numpy MLE fit + matrix inverse."""
    mean = points.mean(axis=0)
    cov = np.cov(points.T, bias=True)
    inv = np.linalg.inv(cov)
    diff = points - mean
    return np.exp(-0.5 * np.einsum("ki,ij,kj->k", diff, inv, diff))


def _iou(box: np.ndarray, gt: np.ndarray) -> float:
    width = max(0.0, min(box[2], gt[2]) - max(box[0], gt[0]))
    height = max(0.0, min(box[3], gt[3]) - max(box[1], gt[1]))
    area = max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])
    gt_area = max(0.0, gt[2] - gt[0]) * max(0.0, gt[3] - gt[1])
    return width * height / (area + gt_area - width * height)


def _strictly_inside(point: np.ndarray, gt: np.ndarray, swap_xy: bool) -> bool:
    x, y = (point[1], point[0]) if swap_xy else (point[0], point[1])
    return bool(gt[0] < x < gt[2] and gt[1] < y < gt[3])


def _reference_masks(logits, pred, centers, gts, labels, xis, k, swap_xy=False):
    """The masks of docs/method.md §3 written as a plain loop, image by image, GT by GT, location
    by location, in numpy float64 (no jitter): the reference the batched code is checked
    against. Returns (masks [M, B, A], background [B, A])."""
    logits, pred, centers = (t.double().numpy() for t in (logits, pred, centers))
    batch, num_points, _ = logits.shape
    masks, background = np.zeros((len(xis), batch, num_points)), np.ones((batch, num_points))
    for b in range(batch):
        for gt, label in zip(gts[b].double().numpy(), labels[b].tolist(), strict=True):
            inside = [_strictly_inside(centers[a], gt, swap_xy) for a in range(num_points)]
            background[b, inside] = 0.0
            for m, xi in enumerate(xis):
                quality = np.array(
                    [
                        _sigmoid(logits[b, a, label]) ** (1 - xi) * _iou(pred[b, a], gt) ** xi
                        for a in range(num_points)
                    ]
                )
                order = np.argsort(-quality, kind="stable")
                top = order[: min(k, num_points)]
                if len(order) > len(top):  # a tie at the cut would make the top-k ambiguous
                    assert quality[top[-1]] > quality[order[len(top)]]
                for a, weight in zip(top, _gaussian_weights(centers[top]), strict=True):
                    if inside[a]:
                        masks[m, b, a] = max(masks[m, b, a], weight)
    return masks, background


# --------------------------------------------------------------------------------------------
# quality_score
# --------------------------------------------------------------------------------------------


def test_quality_score_hand_computed() -> None:
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0], [3.0, 0.5]])  # [A=3, C=2]
    pred = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]])
    gt = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10]])  # [G=2, 4]
    labels = torch.tensor([1, 0])
    xi = 0.8
    q = quality_score(logits, pred, gt, labels, xi)
    # IoU: pred0/pred1 vs gt0 = 1, vs gt1 = 50 / 150; pred2 overlaps neither.
    iou = [[1.0, 1 / 3], [1.0, 1 / 3], [0.0, 0.0]]
    expected = [
        [_sigmoid(logits[a, labels[g]].item()) ** 0.2 * iou[a][g] ** 0.8 for g in range(2)]
        for a in range(3)
    ]
    assert q.shape == (3, 2)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q, torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_quality_score_xi_extremes_and_dtype() -> None:
    logits = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    pred = torch.tensor([[0.0, 0, 4, 4]], dtype=torch.float64)
    gt = torch.tensor([[2.0, 0, 6, 4]], dtype=torch.float64)  # IoU = 8 / 24
    labels = torch.tensor([1])
    q0 = quality_score(logits, pred, gt, labels, 0.0)
    q1 = quality_score(logits, pred, gt, labels, 1.0)
    assert q0.dtype == torch.float64
    assert q0.item() == pytest.approx(_sigmoid(-0.2), rel=1e-12)
    assert q1.item() == pytest.approx(1 / 3, rel=1e-12)


def test_quality_score_no_grad_and_empty() -> None:
    logits = torch.randn(5, 3, requires_grad=True)
    pred = torch.tensor([[0.0, 0, 8, 8]]).repeat(5, 1).requires_grad_()
    q = quality_score(logits, pred, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 0.6)
    assert q.shape == (5, 0)
    q = quality_score(logits, pred, torch.tensor([[0.0, 0, 8, 8]]), torch.tensor([2]), 0.6)
    assert not q.requires_grad


@pytest.mark.parametrize(
    ("logits", "pred", "gt", "labels"),
    [
        (torch.zeros(4), torch.zeros(4, 4), torch.zeros(1, 4), torch.zeros(1, dtype=torch.long)),
        (torch.zeros(4, 2), torch.zeros(3, 4), torch.zeros(1, 4), torch.zeros(1, dtype=torch.long)),
        (torch.zeros(4, 2), torch.zeros(4, 3), torch.zeros(1, 4), torch.zeros(1, dtype=torch.long)),
        (torch.zeros(4, 2), torch.zeros(4, 4), torch.zeros(2, 4), torch.zeros(1, dtype=torch.long)),
        (torch.zeros(4, 2), torch.zeros(4, 4), torch.zeros(1, 4), torch.tensor([2])),
        (torch.zeros(4, 2), torch.zeros(4, 4), torch.zeros(1, 4), torch.tensor([0.0])),
    ],
)
def test_quality_score_bad_shapes(logits, pred, gt, labels) -> None:
    with pytest.raises(ValueError, match=r"\[|integer"):
        quality_score(logits, pred, gt, labels, 0.8)


# --------------------------------------------------------------------------------------------
# pgw_mask
# --------------------------------------------------------------------------------------------


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
    ref = _gaussian_weights(centers[:3].double().numpy())
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
    assert np.abs(expected - _gaussian_weights(points)).max() > 0.01


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
    w0 = _gaussian_weights(centers[[0, 1, 2, 3]].double().numpy())  # GT0: locations 0-3
    w1 = _gaussian_weights(centers[[3, 4, 5, 6]].double().numpy())  # GT1: locations 3-6
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


# --------------------------------------------------------------------------------------------
# background_mask
# --------------------------------------------------------------------------------------------


def test_background_mask_hand_computed() -> None:
    centers = torch.tensor([[4.0, 4], [12, 4], [10, 10], [30, 30], [20, 4]])
    gt = torch.tensor([[0.0, 0, 10, 10], [8, 0, 20, 8]])
    # (4,4) in GT0; (12,4) in GT1; (10,10) on GT0's corner (strict: out) and below GT1;
    # (30,30) in none; (20,4) on GT1's right border (out).
    expected = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
    torch.testing.assert_close(background_mask(centers, gt), expected)


def test_background_mask_no_gt_swap_and_dtype() -> None:
    centers = torch.tensor([[5.0, 50], [50, 5]], dtype=torch.float64)
    assert torch.equal(
        background_mask(centers, torch.zeros(0, 4)), torch.ones(2, dtype=torch.float64)
    )
    gt = torch.tensor([[0.0, 40, 10, 60]])
    out = background_mask(centers, gt)
    assert out.dtype == torch.float64
    assert out.tolist() == [0.0, 1.0]
    assert background_mask(centers, gt, swap_xy=True).tolist() == [1.0, 0.0]


def test_background_mask_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[A, 2\]"):
        background_mask(torch.zeros(4, 3), torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\[G, 4\]"):
        background_mask(torch.zeros(4, 2), torch.zeros(4))


def _random_batch(dtype: torch.dtype):
    """3 images with 3, 0 and 1 GTs (the batched code pads to 3 and must ignore the padding)."""
    torch.manual_seed(5)
    centers = (torch.rand(120, 2) * 64).to(dtype)
    logits = torch.randn(3, 120, 4, dtype=dtype)
    xy = torch.rand(3, 120, 2, dtype=dtype) * 50
    pred = torch.cat([xy, xy + 5 + torch.rand(3, 120, 2, dtype=dtype) * 20], dim=2)
    gts = [
        torch.tensor([[0.0, 0, 30, 30], [20, 10, 60, 50], [5, 25, 45, 60]], dtype=dtype),
        torch.zeros(0, 4, dtype=dtype),
        torch.tensor([[10.0, 10, 40, 50]], dtype=dtype),
    ]
    labels = [torch.tensor([3, 0, 2]), torch.zeros(0, dtype=torch.long), torch.tensor([1])]
    return logits, pred, centers, gts, labels


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("swap_xy", [False, True])
def test_batch_masks_match_the_plain_loop_reference(dtype: torch.dtype, swap_xy: bool) -> None:
    logits, pred, centers, gts, labels = _random_batch(dtype)
    (m_cls, m_reg), bg = batch_masks(
        logits, pred, centers, gts, labels, (0.8, 0.6), 7, 0.0, swap_xy=swap_xy
    )
    assert m_cls.shape == m_reg.shape == bg.shape == (3, 120) and bg.dtype == dtype
    ref_masks, ref_bg = _reference_masks(logits, pred, centers, gts, labels, (0.8, 0.6), 7, swap_xy)
    np.testing.assert_allclose(m_cls.numpy(), ref_masks[0], **_tolerance(dtype))
    np.testing.assert_allclose(m_reg.numpy(), ref_masks[1], **_tolerance(dtype))
    np.testing.assert_array_equal(bg.numpy(), ref_bg)
    assert not m_cls[1].any() and bool((bg[1] == 1).all())  # the image without GT
    assert 0 < int((m_cls[0] > 0).sum()) <= 7 * 3 and (m_cls[2] > 0).any()
    assert not torch.equal(m_cls, m_reg) and (bg == 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_image_functions_match_the_plain_loop_reference(dtype: torch.dtype) -> None:
    logits, pred, centers, gts, labels = _random_batch(dtype)
    ref_masks, ref_bg = _reference_masks(logits, pred, centers, gts, labels, (0.8, 0.6), 7)
    for i in range(3):
        for xi, ref in zip((0.8, 0.6), ref_masks, strict=True):
            q = quality_score(logits[i], pred[i], gts[i], labels[i], xi)
            assert q.shape == (120, len(gts[i])) and q.dtype == dtype
            mask = pgw_mask(q, centers, gts[i], 7, 0.0)
            np.testing.assert_allclose(mask.numpy(), ref[i], **_tolerance(dtype))
        np.testing.assert_array_equal(background_mask(centers, gts[i]).numpy(), ref_bg[i])


def test_batch_masks_jitter_and_errors() -> None:
    centers = torch.rand(50, 2) * 32
    logits, pred = torch.randn(2, 50, 3), torch.rand(2, 50, 4) * 32
    pred[..., 2:] += pred[..., :2]
    gts = [torch.tensor([[0.0, 0, 20, 20]]), torch.tensor([[4.0, 4, 30, 30]])]
    labels = [torch.tensor([0]), torch.tensor([2])]
    gen = torch.Generator().manual_seed(0)
    (mask,), bg = batch_masks(logits, pred, centers, gts, labels, (0.8,), 9, 0.5, gen)
    assert bool(((mask >= 0) & (mask <= 1)).all()) and (mask > 0).sum(dim=1).le(9).all()
    with pytest.raises(ValueError, match=r"lie in \[0, 3\), got values in \[0, 3\]"):
        batch_masks(logits, pred, centers, gts, [labels[0], torch.tensor([3])], (0.8,), 9)
    with pytest.raises(ValueError, match="one gt_boxes and one gt_labels tensor per image"):
        batch_masks(logits, pred, centers, gts[:1], labels[:1], (0.8,), 9)
    with pytest.raises(ValueError, match=r"gt_labels\[1\] must have shape \[G\] with G = 1"):
        batch_masks(logits, pred, centers, gts, [labels[0], torch.tensor([0, 1])], (0.8,), 9)
    with pytest.raises(ValueError, match="integer class indices"):
        batch_masks(logits, pred, centers, gts, [labels[0], torch.tensor([1.0])], (0.8,), 9)
    # No GT anywhere: empty masks, background everywhere.
    empty = [torch.zeros(0, 4)] * 2
    (mask,), bg = batch_masks(logits, pred, centers, empty, [torch.zeros(0)] * 2, (0.8,), 9)
    assert not mask.any() and bool((bg == 1).all())


# --------------------------------------------------------------------------------------------
# Edges, defaults and messages (survivors of `make mutate`)
# --------------------------------------------------------------------------------------------


def test_quality_iou_of_boxes_away_from_the_origin() -> None:
    logits = torch.zeros(2, 1)  # score 0.5
    pred = torch.tensor([[5.0, 5, 15, 15], [12.0, 2, 16, 4]])
    gt = torch.tensor([[0.0, 0, 10, 10]])
    q = quality_score(logits, pred, gt, torch.tensor([0]), 1.0)  # xi = 1: the IoU alone
    torch.testing.assert_close(q, torch.tensor([[25 / 175], [0.0]]))
    flat = quality_score(logits[:1], torch.tensor([[2.0, 2, 2, 8]]), gt, torch.tensor([0]), 1.0)
    assert flat.item() == 0.0  # a zero-width box has no area and no overlap


def test_pgw_single_location_and_defaults() -> None:
    centers = torch.tensor([[2.0, 2], [6, 6], [9, 1]])
    quality = torch.tensor([[0.2], [0.9], [0.1]])
    gt = torch.tensor([[0.0, 0, 10, 10]])
    assert pgw_mask(quality, centers, gt, k=1, jitter=0.0).tolist() == [0.0, 1.0, 0.0]
    # the defaults are the contract: jitter 0.05, the correct (unswapped) inside test
    default = pgw_mask(quality, centers, gt, 3, generator=torch.Generator().manual_seed(1))
    explicit = pgw_mask(quality, centers, gt, 3, 0.05, torch.Generator().manual_seed(1))
    assert torch.equal(default, explicit) and not torch.equal(
        default, pgw_mask(quality, centers, gt, 3, 0.0)
    )
    tall = torch.tensor([[0.0, 0, 4, 20]])  # (9, 1) is outside, its transpose (1, 9) inside
    assert pgw_mask(quality, centers, tall, 3, 0.0)[2] == 0
    logits = torch.full((1, 3, 1), 3.0)
    boxes = torch.tensor([[[0.0, 0, 4, 20]] * 3])
    (mask,), bg = batch_masks(logits, boxes, centers, [tall], [torch.tensor([0])], (1.0,), 3, 0.0)
    assert mask[0, 2] == 0 and bg[0].tolist() == [0.0, 1.0, 1.0]
    args = (logits, boxes, centers, [tall], [torch.tensor([0])], (1.0,), 3)
    (default,), _ = batch_masks(*args, generator=torch.Generator().manual_seed(2))
    (explicit,), _ = batch_masks(*args, 0.05, torch.Generator().manual_seed(2))
    assert torch.equal(default, explicit) and not torch.equal(
        default, batch_masks(*args, 0.0)[0][0]
    )


def test_no_locations_gives_empty_masks() -> None:
    gt = torch.tensor([[0.0, 0, 10, 10]])
    assert pgw_mask(torch.zeros(0, 1), torch.zeros(0, 2), gt, k=3).shape == (0,)
    (mask,), bg = batch_masks(
        torch.zeros(2, 0, 3),
        torch.zeros(2, 0, 4),
        torch.zeros(0, 2),
        [gt, gt],
        [torch.tensor([0])] * 2,
        (0.8,),
        3,
    )
    assert mask.shape == bg.shape == (2, 0)


def test_batch_masks_checks_each_size_on_its_own_and_keeps_float64() -> None:
    logits, pred, centers = torch.zeros(2, 5, 3), torch.zeros(2, 5, 4), torch.zeros(5, 2)
    gts, labels = [torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.long)] * 2
    with pytest.raises(
        ValueError,
        match=r"must match cls_logits \[B, A, C\] = \(2, 5, 3\), got "
        r"\(2, 4, 4\) and \(5, 2\)",
    ):
        batch_masks(logits, pred[:, :4], centers, gts, labels, (0.8,), 3)
    with pytest.raises(ValueError, match=r"got \(2, 5, 4\) and \(4, 2\)$"):
        batch_masks(logits, pred, centers[:4], gts, labels, (0.8,), 3)
    with pytest.raises(ValueError, match="got 2 and 1$"):
        batch_masks(logits, pred, centers, gts, labels[:1], (0.8,), 3)
    (mask,), bg = batch_masks(logits.double(), pred, centers, gts, labels, (0.8,), 3)
    assert mask.dtype == bg.dtype == torch.float64 and bool((bg == 1).all())


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: pgw_mask(torch.zeros(4, 1), torch.zeros(4, 3), torch.zeros(1, 4), 2),
            ValueError,
            r"^centers must have shape \[A, 2\], got \(4, 3\)$",
        ),
        (
            lambda: pgw_mask(torch.zeros(4, 1), torch.zeros(4, 2), [[0, 0, 1, 1]], 2),
            TypeError,
            r"^gt_boxes must be a torch.Tensor of shape \[G, 4\], got <class 'list'>$",
        ),
        (
            lambda: pgw_mask(torch.zeros(4), torch.zeros(4, 2), torch.zeros(1, 4), 2),
            ValueError,
            r"^quality must have shape \[A, G\], got \(4,\)$",
        ),
        (
            lambda: pgw_mask(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(1, 4), 2),
            ValueError,
            r"^quality must have shape \[A, G\] = \(4, 1\) \(A from centers, G from "
            r"gt_boxes\), got \(4, 2\)$",
        ),
        (
            lambda: pgw_mask(torch.zeros(4, 1), torch.zeros(4, 2), torch.zeros(1, 4), 0),
            ValueError,
            r"^k must be >= 1, got 0$",
        ),
        (
            lambda: pgw_mask(torch.zeros(4, 1), torch.zeros(4, 2), torch.zeros(1, 4), 2, -0.1),
            ValueError,
            r"^jitter must be >= 0, got -0.1$",
        ),
        (
            lambda: background_mask(torch.zeros(4, 2), torch.zeros(1, 3)),
            ValueError,
            r"^gt_boxes must have shape \[G, 4\], got \(1, 3\)$",
        ),
        (
            lambda: quality_score(
                torch.zeros(4), torch.zeros(4, 4), torch.zeros(0, 4), torch.zeros(0), 0.8
            ),
            ValueError,
            r"^cls_logits must have shape \[A, C\], got \(4,\)$",
        ),
        (
            lambda: quality_score(
                torch.zeros(4, 2), torch.zeros(4, 3), torch.zeros(0, 4), torch.zeros(0), 0.8
            ),
            ValueError,
            r"^pred_boxes must have shape \[A, 4\], got \(4, 3\)$",
        ),
        (
            lambda: quality_score(
                torch.zeros(4, 2), torch.zeros(3, 4), torch.zeros(0, 4), torch.zeros(0), 0.8
            ),
            ValueError,
            r"^pred_boxes must have shape \[A, 4\] with A = 4 \(from cls_logits\), "
            r"got \(3, 4\)$",
        ),
        (
            lambda: quality_score(
                torch.zeros(4, 2),
                torch.zeros(4, 4),
                torch.zeros(1, 4),
                torch.zeros(1, 1, dtype=torch.long),
                0.8,
            ),
            ValueError,
            r"^gt_labels must have shape \[G\], got \(1, 1\)$",
        ),
        (
            lambda: batch_masks(
                torch.zeros(4, 2), torch.zeros(1, 4, 4), torch.zeros(4, 2), [], [], (0.8,), 2
            ),
            ValueError,
            r"^cls_logits must have shape \[B, A, C\], got \(4, 2\)$",
        ),
        (
            lambda: batch_masks(
                torch.zeros(1, 4, 2), torch.zeros(1, 4, 3), torch.zeros(4, 2), [], [], (0.8,), 2
            ),
            ValueError,
            r"^pred_boxes must have shape \[B, A, 4\], got \(1, 4, 3\)$",
        ),
        (
            lambda: batch_masks(
                torch.zeros(1, 4, 2),
                torch.zeros(1, 4, 4),
                torch.zeros(4, 2),
                [torch.zeros(1, 3)],
                [torch.zeros(1)],
                (0.8,),
                2,
            ),
            ValueError,
            r"^gt_boxes\[0\] must have shape \[G, 4\], got \(1, 3\)$",
        ),
    ],
)
def test_errors_name_the_argument_and_the_expected_shape(call, error, message) -> None:
    with pytest.raises(error, match=message):
        call()
