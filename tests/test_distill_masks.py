"""Tests of pgd_deploy.distill.masks (and the batched mask_ops behind it): the quality score and
the background mask against hand computations, and the batched masks and the per-image functions
against a plain loop rendering of docs/method.md §3 (`_mask_reference.reference_masks`). The PGW
mask is tested in test_distill_masks_pgw.py; edges, defaults and error messages in
test_distill_masks_edges.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _mask_reference import reference_masks, sigmoid

from pgd_deploy.distill import background_mask, pgw_mask, quality_score
from pgd_deploy.distill.masks import batch_masks

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
        [sigmoid(logits[a, labels[g]].item()) ** 0.2 * iou[a][g] ** 0.8 for g in range(2)]
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
    assert q0.item() == pytest.approx(sigmoid(-0.2), rel=1e-12)
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


# --------------------------------------------------------------------------------------------
# The batched masks and the per-image functions against the plain-loop reference
# --------------------------------------------------------------------------------------------


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
    ref_masks, ref_bg = reference_masks(logits, pred, centers, gts, labels, (0.8, 0.6), 7, swap_xy)
    np.testing.assert_allclose(m_cls.numpy(), ref_masks[0], **_tolerance(dtype))
    np.testing.assert_allclose(m_reg.numpy(), ref_masks[1], **_tolerance(dtype))
    np.testing.assert_array_equal(bg.numpy(), ref_bg)
    assert not m_cls[1].any() and bool((bg[1] == 1).all())  # the image without GT
    assert 0 < int((m_cls[0] > 0).sum()) <= 7 * 3 and (m_cls[2] > 0).any()
    assert not torch.equal(m_cls, m_reg) and (bg == 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_image_functions_match_the_plain_loop_reference(dtype: torch.dtype) -> None:
    logits, pred, centers, gts, labels = _random_batch(dtype)
    ref_masks, ref_bg = reference_masks(logits, pred, centers, gts, labels, (0.8, 0.6), 7)
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
