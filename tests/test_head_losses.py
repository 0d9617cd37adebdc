"""The anchor heads' loss values against a per-positive reading of their definitions (ATSS:
focal, GIoU and IoU-branch BCE, each over the positive count; GFL: QFL over the positive count,
GIoU and DFL weighted by each positive's top class score over the sum of those weights)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from test_atss import TARGETS, _atss
from test_gfl import _gfl
from torchvision.ops import generalized_box_iou, sigmoid_focal_loss

from pgd_deploy.models.atss import aligned_iou, atss_targets, delta_decode
from pgd_deploy.models.gfl import DFL_EPS, distribution_focal_loss, integral_decode
from pgd_deploy.models.heads import flatten_levels


def _positives(model, out, targets):
    priors = model.priors(out)
    labels, gt_boxes = atss_targets(priors, targets, 3, model.head.topk)
    labels, gt_boxes = labels.reshape(-1), gt_boxes.reshape(-1, 4)
    pos = torch.nonzero(labels < 3).squeeze(1)
    assert pos.numel() > 1
    return priors, labels, gt_boxes, pos


def test_atss_losses_are_sums_over_the_positive_count():
    model = _atss()
    out = model(torch.randn(2, 3, 64, 64))
    priors, labels, gt_boxes, pos = _positives(model, out, TARGETS)
    cls = flatten_levels(out.cls_logits).reshape(-1, 3).detach()
    onehot = torch.zeros_like(cls)
    onehot[pos, labels[pos]] = 1.0
    n = pos.numel()
    focal = sigmoid_focal_loss(cls, onehot, alpha=0.25, gamma=2.0, reduction="sum") / n
    deltas = flatten_levels(out.box_regression).reshape(-1, 4).detach()
    anchors = priors.anchors[pos % priors.anchors.shape[0]]
    giou = torch.stack([
        1 - generalized_box_iou(delta_decode(deltas[i : i + 1], anchors[k : k + 1]),
                                gt_boxes[i : i + 1])[0, 0]
        for k, i in enumerate(pos.tolist())
    ]).sum() / n  # fmt: skip
    losses = model.loss(out, TARGETS)
    torch.testing.assert_close(losses["loss_cls"], focal)
    torch.testing.assert_close(losses["loss_box"], giou)
    # without any positive: the focal sum over a count of 1, and graph-connected zeros
    empty = model.loss(out, TARGETS[1:] * 2)
    background = sigmoid_focal_loss(cls, torch.zeros_like(cls), reduction="sum")
    torch.testing.assert_close(empty["loss_cls"], background)
    assert empty["loss_box"].item() == empty["loss_iou"].item() == 0.0
    assert empty["loss_box"].requires_grad and empty["loss_iou"].requires_grad


def test_gfl_box_and_dfl_losses_are_weighted_by_the_top_class_score():
    model = _gfl()
    with torch.no_grad():  # confident scores: the weights sum above the floor of 1
        model.head.cls_logits.bias.fill_(2.0)
    out = model(torch.randn(2, 3, 64, 64))
    priors, labels, gt_boxes, pos = _positives(model, out, TARGETS)
    reg_max = model.head.reg_max
    cls = flatten_levels(out.cls_logits).reshape(-1, 3).detach()
    dist = flatten_levels(out.box_regression).reshape(-1, 4 * (reg_max + 1)).detach()
    box_terms, dfl_terms, weights = [], [], []
    for i in pos.tolist():
        k = i % priors.centers.shape[0]
        stride = float(priors.strides[k])
        center = priors.centers[k] / stride
        sides = integral_decode(dist[i : i + 1], reg_max)[0]
        pred = torch.cat([center - sides[:2], center + sides[2:]])
        target = gt_boxes[i] / stride
        box_terms.append(1 - generalized_box_iou(pred[None], target[None])[0, 0])
        distances = torch.cat([center - target[:2], target[2:] - center])
        distances = distances.clamp(0, reg_max - DFL_EPS)
        bins = dist[i].reshape(4, reg_max + 1)
        dfl_terms.append(distribution_focal_loss(bins, distances).mean())
        weights.append(cls[i].sigmoid().max())
    weights = torch.stack(weights)
    assert weights.sum() > 2
    losses = model.loss(out, TARGETS)
    expected_box = (torch.stack(box_terms) * weights).sum() / weights.sum().clamp(min=1.0)
    expected_dfl = (torch.stack(dfl_terms) * weights).sum() / weights.sum().clamp(min=1.0)
    torch.testing.assert_close(losses["loss_box"], expected_box)
    torch.testing.assert_close(losses["loss_dfl"], expected_dfl)
    # the QFL target of a positive is its decoded box's IoU with its GT
    assert 0 < float(aligned_iou(pred[None], target[None])) <= 1


def test_gfl_without_any_positive_has_the_background_qfl_over_a_count_of_one():
    from pgd_deploy.models.gfl import quality_focal_loss

    model = _gfl()
    out = model(torch.randn(1, 3, 64, 64))
    cls = flatten_levels(out.cls_logits).reshape(-1, 3).detach()
    labels = torch.full((cls.shape[0],), 3)
    expected = quality_focal_loss(cls, labels, torch.zeros(cls.shape[0])).sum()
    losses = model.loss(out, TARGETS[1:])
    torch.testing.assert_close(losses["loss_cls"], expected)
    assert losses["loss_box"].item() == losses["loss_dfl"].item() == 0.0
    background = F.binary_cross_entropy_with_logits(cls, torch.zeros_like(cls), reduction="none")
    assert float(losses["loss_cls"].detach()) < float(background.sum())  # QFL's modulating factor
