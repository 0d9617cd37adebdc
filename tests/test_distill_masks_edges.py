"""Tests of pgd_deploy.distill.masks at its edges (survivors of `make mutate`): boxes away from the
origin, a single location, no locations, the defaults that are the contract, and error messages
that name the argument and the expected shape."""

from __future__ import annotations

import pytest
import torch

from pgd_deploy.distill import background_mask, pgw_mask, quality_score
from pgd_deploy.distill.masks import batch_masks


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
