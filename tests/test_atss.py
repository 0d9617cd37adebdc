"""ATSS, the second dense head (issue 35): the `atss_assign` contract on hand-computed cases and
against a per-GT reference loop, the head's priors, decoding, losses and gradients (a short run,
its export and a bit-exact PGD resume are in test_anchor_heads.py, the overfit run in
test_overfit.py)."""

from __future__ import annotations

import math

import pytest
import torch
from _bench_scripts import load_bench

from pgd_deploy.config import ModelConfig
from pgd_deploy.models import ATSSHead, atss_assign, build_detector
from pgd_deploy.models.atss import aligned_iou, delta_decode
from pgd_deploy.models.heads import flatten_levels

# Level 0: four 10 px anchors in a row, centres (5, 5) .. (35, 5); level 1: two 20 px anchors.
LEVEL0 = torch.tensor([[0.0, 0, 10, 10], [10, 0, 20, 10], [20, 0, 30, 10], [30, 0, 40, 10]])
LEVEL1 = torch.tensor([[0.0, 0, 20, 20], [20, 0, 40, 20]])
TWO_LEVELS = torch.cat([LEVEL0, LEVEL1])


def test_candidates_come_from_every_level_and_the_threshold_is_mean_plus_unbiased_std():
    # GT centre (9, 9). Level 0's two nearest: anchors 0 and 1 (IoU 0.3086, 0.2326); level 1's:
    # anchors 4 and 5 (IoU 0.81, 0). Mean 0.3378 + unbiased std 0.3411 = 0.6789: only anchor 4.
    gt = torch.tensor([[0.0, 0, 18, 18]])
    assert atss_assign(TWO_LEVELS, [4, 2], gt, topk=2).tolist() == [-1, -1, -1, -1, 0, -1]
    # One level only: candidates 0 and 1; mean + std of two different values exceeds both.
    assert atss_assign(LEVEL0, [4], gt, topk=2).tolist() == [-1] * 4


def test_topk_changes_the_threshold():
    gt = torch.tensor([[2.0, 0, 18, 10]])  # centre (10, 5): anchors 0 and 1 both 5 px away
    # topk 2: IoUs 0.444, 0.444 (std 0): both positive, centres inside
    assert atss_assign(LEVEL0, [4], gt, topk=2).tolist() == [0, 0, -1, -1]
    # topk 3 adds anchor 2 (IoU 0): threshold 0.296 + 0.256 = 0.553 > 0.444: none
    assert atss_assign(LEVEL0, [4], gt, topk=3).tolist() == [-1] * 4


def test_a_contested_anchor_goes_to_the_gt_it_overlaps_most_and_ties_to_the_first():
    wide = torch.tensor([[2.0, 0, 18, 10], [4.0, 1, 16, 9]])  # both claim anchors 0 and 1
    iou = aligned_iou(LEVEL0[:2].repeat(2, 1), wide.repeat_interleave(2, 0))
    assert iou[0] > iou[2] and iou[1] > iou[3]
    assert atss_assign(LEVEL0, [4], wide, topk=2).tolist() == [0, 0, -1, -1]
    assert atss_assign(LEVEL0, [4], wide.flip(0), topk=2).tolist() == [1, 1, -1, -1]
    twins = torch.tensor([[2.0, 0, 18, 10], [2.0, 0, 18, 10]])
    assert atss_assign(LEVEL0, [4], twins, topk=2).tolist() == [0, 0, -1, -1]
    assert atss_assign(LEVEL0, [4], twins.flip(0), topk=2).tolist() == [0, 0, -1, -1]


def test_an_empty_image_and_a_gt_smaller_than_every_anchor():
    assert atss_assign(TWO_LEVELS, [4, 2], torch.zeros(0, 4)).tolist() == [-1] * 6
    # 2x2 GT on anchor 0's centre: IoU 0.04 among 0.04, 0 (level 0), 0.01, 0 (level 1):
    # threshold 0.0125 + 0.0189 > 0.04? no: 0.0314 -> anchor 0 is positive, centre inside by 1.
    tiny = torch.tensor([[4.0, 4, 6, 6]])
    assert atss_assign(TWO_LEVELS, [4, 2], tiny, topk=2).tolist() == [0, -1, -1, -1, -1, -1]
    # The centre must be inside by more than 0.01 px. Symmetric GTs around x = 10 give anchors
    # 0 and 1 equal IoUs (std 0: both pass the IoU test); their centres are 1/128 px (too
    # little) or 1/64 px inside.
    close = torch.tensor([[5 - 1 / 128, 0.0, 15 + 1 / 128, 10.0]])
    assert atss_assign(LEVEL0, [4], close, topk=2).tolist() == [-1] * 4
    inside = torch.tensor([[5 - 1 / 64, 0.0, 15 + 1 / 64, 10.0]])
    assert atss_assign(LEVEL0, [4], inside, topk=2).tolist() == [0, 0, -1, -1]


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="must sum to A = 4"):
        atss_assign(LEVEL0, [3], torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"gt_boxes \[G, 4\]"):
        atss_assign(LEVEL0, [4], torch.zeros(4))


def test_matches_a_per_gt_reference_on_random_images():
    head = ATSSHead(num_classes=3, channels=32, num_convs=1)
    priors = head.priors([(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)], (8, 16, 32, 64, 128), "cpu")
    reference = load_bench("atss_assign").per_gt_loop  # MMDetection's reading, one GT at a time
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        g = int(torch.randint(0, 12, (1,), generator=gen))
        xy = torch.rand(g, 2, generator=gen) * 100
        wh = torch.rand(g, 2, generator=gen) * 90 + 2
        gts = torch.cat([xy, xy + wh], dim=1)
        got = atss_assign(priors.anchors, priors.level_sizes, gts, topk=9)
        want = reference(priors.anchors, priors.level_sizes, gts, 9)
        assert got.tolist() == want.tolist()


def test_priors_are_anchors_of_8_strides_centred_on_the_grid_corners():
    head = ATSSHead(num_classes=3, channels=32, num_convs=1)
    priors = head.priors([(2, 3), (1, 2)], (8, 16), "cpu")
    assert priors.level_sizes == (6, 2)
    assert priors.centers[:4].tolist() == [[0.0, 0.0], [8.0, 0.0], [16.0, 0.0], [0.0, 8.0]]
    assert priors.anchors[1].tolist() == [-24.0, -32.0, 40.0, 32.0]
    assert priors.anchors[6].tolist() == [-64.0, -64.0, 64.0, 64.0]


def test_delta_decoding_uses_the_stds_and_clamps_the_log_ratios():
    anchor = torch.tensor([[0.0, 0, 64, 64]])
    assert delta_decode(torch.zeros(1, 4), anchor).tolist() == [[0.0, 0.0, 64.0, 64.0]]
    moved = delta_decode(torch.tensor([[1.0, 0, 0, 0]]), anchor)  # dx 1 -> 0.1 * 64 px
    assert moved[0].tolist() == pytest.approx([6.4, 0.0, 70.4, 64.0])
    grown = delta_decode(torch.tensor([[0.0, 0, 5, 0]]), anchor)  # dw 5 * 0.2 -> x e^1
    assert (grown[0, 2] - grown[0, 0]).item() == pytest.approx(64 * math.e, rel=1e-5)
    huge = delta_decode(torch.tensor([[0.0, 0, 1e4, 0]]), anchor)
    assert (huge[0, 2] - huge[0, 0]).item() == pytest.approx(64 * 1000 / 16, rel=1e-4)


TARGETS = [
    {"boxes": torch.tensor([[8.0, 10, 50, 60], [30, 4, 62, 40]]), "labels": torch.tensor([1, 2])},
    {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
]


def _atss(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(head="atss", depth=18, fpn_channels=64, head_convs=2, **kw)
    return build_detector(cfg, num_classes=3)


def test_build_shapes_losses_and_gradients():
    model = _atss()
    assert isinstance(model.head, ATSSHead)
    out = model(torch.randn(2, 3, 64, 64))
    assert [t.shape[-1] for t in out.cls_taps] == [8, 4, 2, 1, 1]
    assert out.cls_taps[0].shape == out.reg_taps[0].shape == (2, 64, 8, 8)
    assert out.quality is not None and out.quality[0].shape == (2, 1, 8, 8)
    boxes, scores = model.decode(out)
    assert boxes.shape == (2, 86, 4) and scores.shape == (2, 86, 3)
    cls = flatten_levels(out.cls_logits).sigmoid()
    iou = flatten_levels(out.quality).sigmoid()
    torch.testing.assert_close(scores, cls * iou)  # the test score: class x IoU prediction
    losses = model.loss(out, TARGETS)
    assert set(losses) == {"loss_cls", "loss_box", "loss_iou"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    sum(losses.values()).backward()
    head = model.head
    for conv in (head.cls_logits, head.bbox_pred, head.iou_pred, head.towers.cls_tower[0][0]):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert dict(head.loss_weights) == {"loss_box": 2.0}


def test_the_iou_branch_learns_the_positives_iou():
    model = _atss()
    out = model(torch.randn(1, 3, 64, 64))
    priors = model.priors(out)
    labels, gt_boxes = model.head.targets(priors, TARGETS[:1])
    pos = labels[0] < 3
    assert int(pos.sum()) > 0
    deltas = flatten_levels(out.box_regression)[0][pos]
    pred = delta_decode(deltas, priors.anchors[pos])
    target = aligned_iou(pred, gt_boxes[0][pos]).detach()
    iou_logits = flatten_levels(out.quality)[0, pos, 0]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        iou_logits, target, reduction="sum"
    ) / int(pos.sum())
    torch.testing.assert_close(model.loss(out, TARGETS[:1])["loss_iou"], expected)
