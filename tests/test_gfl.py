"""GFL, the third dense head (issue 36): Quality Focal Loss, Distribution Focal Loss and the
integral decoding on hand-computed cases, then the head's decoding, losses and gradients (the
short run, export and PGD resume are in test_anchor_heads.py, the overfit run in
test_overfit.py)."""

from __future__ import annotations

import math

import pytest
import torch

from pgd_deploy.config import ModelConfig
from pgd_deploy.models import (
    GFLHead,
    build_detector,
    distribution_focal_loss,
    integral_decode,
    quality_focal_loss,
)
from pgd_deploy.models.atss import aligned_iou, atss_targets
from pgd_deploy.models.heads import flatten_levels

LOG2 = math.log(2)


def test_quality_focal_loss_by_hand():
    logits = torch.zeros(3, 2, dtype=torch.float64)  # sigmoid 0.5 everywhere
    labels = torch.tensor([0, 2, -1])  # a positive of class 0; two backgrounds (C and -1)
    scores = torch.tensor([0.6, 0.9, 0.9], dtype=torch.float64)  # ignored for the backgrounds
    # positive: class 0 BCE(0.5 -> 0.6) = log 2 times |0.6 - 0.5|^beta; class 1 log 2 x 0.5^beta
    two = quality_focal_loss(logits, labels, scores)
    torch.testing.assert_close(two, torch.tensor([0.26, 0.5, 0.5], dtype=torch.float64) * LOG2)
    one = quality_focal_loss(logits, labels, scores, beta=1.0)
    torch.testing.assert_close(one, torch.tensor([0.6, 1.0, 1.0], dtype=torch.float64) * LOG2)
    # a score below the prediction is pulled down as hard as one above is pulled up
    below = quality_focal_loss(logits[:1], labels[:1], torch.tensor([0.4], dtype=torch.float64))
    torch.testing.assert_close(below, two[:1])
    # a confident, exact prediction costs nothing but the BCE of its own entropy
    sharp = torch.tensor([[math.log(0.8 / 0.2), -30.0]], dtype=torch.float64)
    exact = quality_focal_loss(sharp, torch.tensor([0]), torch.tensor([0.8], dtype=torch.float64))
    assert exact.item() < 1e-20
    with pytest.raises(ValueError, match="logits \\[N, C\\]"):
        quality_focal_loss(logits[0], labels, scores)


def test_distribution_focal_loss_by_hand():
    zeros = torch.zeros(1, 17, dtype=torch.float64)  # n = 16: bins 0..16
    edge = distribution_focal_loss(zeros, torch.tensor([2.0], dtype=torch.float64))
    torch.testing.assert_close(edge, torch.tensor([math.log(17)], dtype=torch.float64))
    logits = zeros.clone()
    logits[0, 3] = LOG2  # softmax denominator 18: CE(bin 2) = log 18, CE(bin 3) = log 9
    between = distribution_focal_loss(logits, torch.tensor([2.3], dtype=torch.float64))
    expected = 0.7 * math.log(18) + 0.3 * math.log(9)
    torch.testing.assert_close(between, torch.tensor([expected], dtype=torch.float64))
    last = zeros.clone()
    last[0, 16] = math.log(3)  # the last bin: denominator 19
    top = distribution_focal_loss(last, torch.tensor([15.99], dtype=torch.float64))
    expected = 0.01 * math.log(19) + 0.99 * (math.log(19) - math.log(3))
    torch.testing.assert_close(top, torch.tensor([expected], dtype=torch.float64))
    with pytest.raises(ValueError, match="target \\[N\\]"):
        distribution_focal_loss(zeros, torch.tensor([1.0, 2.0]))


def test_integral_decode_reads_the_sides_one_after_the_other():
    logits = torch.zeros(2, 4 * 17, dtype=torch.float64)
    torch.testing.assert_close(integral_decode(logits, 16)[0], torch.full((4,), 8.0).double())
    logits[1, 17 + 3] = 60.0  # side t (the second block of 17): all mass on bin 3
    logits[1, 3 * 17 + 16] = 60.0  # side b: the last bin
    logits[1, 4] = LOG2  # side l: bin 4 twice as likely as each other bin
    sides = integral_decode(logits, 16)[1]
    torch.testing.assert_close(sides, torch.tensor([140 / 18, 3.0, 8.0, 16.0]).double())
    assert integral_decode(torch.zeros(5, 7, 4 * 9), 8).shape == (5, 7, 4)
    with pytest.raises(ValueError, match="4 \\* \\(reg_max \\+ 1\\) = 68"):
        integral_decode(torch.zeros(2, 64), 16)


TARGETS = [
    {"boxes": torch.tensor([[8.0, 10, 50, 60], [30, 4, 62, 40]]), "labels": torch.tensor([1, 2])},
    {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
]


def _gfl(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(head="gfl", depth=18, fpn_channels=64, head_convs=2, **kw)
    return build_detector(cfg, num_classes=3)


def test_decoding_is_the_integral_times_each_levels_stride():
    model = _gfl()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.quality is None and out.box_regression[0].shape == (2, 4 * 17, 8, 8)
    for t in out.box_regression:  # uniform distributions: every side is 8 bins
        t.data.zero_()
    boxes, scores = model.decode(out)
    assert boxes.shape == (2, 86, 4) and scores.shape == (2, 86, 3)
    torch.testing.assert_close(scores, flatten_levels(out.cls_logits).sigmoid())
    priors = model.priors(out)
    for index, stride in ((0, 8), (64, 16), (85, 128)):  # the first anchor of P3, P4, and P7
        x, y = priors.centers[index].tolist()
        expected = torch.tensor([x - 8 * stride, y - 8 * stride, x + 8 * stride, y + 8 * stride])
        torch.testing.assert_close(boxes[1, index], expected)
    logits, guided = model.head.guidance(out, priors)
    torch.testing.assert_close(guided, boxes)  # PGD's teacher boxes: the same decoding
    torch.testing.assert_close(logits, flatten_levels(out.cls_logits))  # the joint score


def test_losses_gradients_and_the_quality_target_is_the_positives_iou():
    model = _gfl()
    out = model(torch.randn(2, 3, 64, 64))
    losses = model.loss(out, TARGETS)
    assert set(losses) == {"loss_cls", "loss_box", "loss_dfl"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    sum(losses.values()).backward()
    head = model.head
    for conv in (head.cls_logits, head.bbox_pred, head.towers.cls_tower[0][0]):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert dict(head.loss_weights) == {"loss_box": 2.0, "loss_dfl": 0.25}
    # QFL's target: the IoU of each positive's decoded box with its GT, the others 0
    out = model(torch.randn(1, 3, 64, 64))
    priors = model.priors(out)
    labels, gt_boxes = atss_targets(priors, TARGETS[:1], 3, 9)
    pos = labels[0] < 3
    assert int(pos.sum()) > 0
    boxes, _ = model.decode(out)
    iou = torch.zeros(labels.shape[1])
    iou[pos] = aligned_iou(boxes[0][pos].detach(), gt_boxes[0][pos])
    cls = flatten_levels(out.cls_logits)[0].detach()
    expected = quality_focal_loss(cls, labels[0], iou).sum() / int(pos.sum())
    torch.testing.assert_close(model.loss(out, TARGETS[:1])["loss_cls"], expected)


def test_an_image_without_objects_has_zero_box_losses_with_a_graph():
    model = _gfl()
    losses = model.loss(model(torch.randn(1, 3, 64, 64)), TARGETS[1:])
    assert losses["loss_box"].item() == losses["loss_dfl"].item() == 0.0
    assert losses["loss_cls"] > 0 and losses["loss_box"].requires_grad


def test_reg_max_comes_from_the_config_and_is_checked():
    model = _gfl(reg_max=8)
    assert isinstance(model.head, GFLHead) and model.head.bbox_pred.out_channels == 36
    assert model.head.layout()["distribution bins"] == 9
    with pytest.raises(ValueError, match="config key 'model.reg_max': must be >= 1, got 0"):
        _gfl(reg_max=0)


def test_the_official_stride_bug_is_reproduced_only_on_request():
    """D4: the official GFL distill code decodes the i-th image of its per-GPU batch with
    stride 8 * 2^i on every level; `distill.index_stride` reproduces it."""
    from pgd_deploy.distill import Distiller
    from pgd_deploy.distill.masks import batch_masks

    model = _gfl()
    out = model(torch.randn(3, 3, 64, 64))
    for t in out.box_regression:
        t.data.zero_()  # every side 8 bins
    right, boxes, priors = model.guidance(out)
    _, wrong, _ = model.guidance(out, index_stride_group=2)
    torch.testing.assert_close(boxes, model.decode(out)[0])
    centers = torch.cat([priors.centers, priors.centers], dim=1)
    for image, stride in ((0, 8), (1, 16), (2, 8)):  # groups of 2: indices 0, 1, 0
        sides = torch.tensor([-8.0, -8.0, 8.0, 8.0]) * stride  # on every level
        torch.testing.assert_close(wrong[image] - centers, sides.expand_as(centers))
    targets = [
        {"boxes": torch.tensor([[4.0, 4, 60, 60]]), "labels": torch.tensor([1])} for _ in range(3)
    ]
    plain = Distiller(teacher=model, jitter=0.0, topk=30, mask_group=2)
    official = Distiller(teacher=model, jitter=0.0, topk=30, mask_group=2, index_stride=True)
    (expected,), _ = batch_masks(
        right,
        wrong,
        priors.centers,
        [t["boxes"] for t in targets],
        [t["labels"] for t in targets],
        (0.8,),
        30,
        0.0,
    )
    torch.testing.assert_close(official.masks(out, targets)[0], expected)
    assert not torch.equal(plain.masks(out, targets)[0], expected)


def test_the_onnx_graph_holds_the_integral_as_a_softmax_and_a_fixed_projection(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from pgd_deploy.export.precision import find_fp32_islands
    from pgd_deploy.export.to_onnx import export_onnx

    model = _gfl().eval()
    images = torch.randn(1, 3, 64, 64)
    path = tmp_path / "gfl.onnx"
    onnx.save(export_onnx(model, imgsz=(64, 64), simplify=False), str(path))
    graph = onnx.load(str(path)).graph
    softmax = [n.name for n in graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 1 and not any(n.op_type == "MatMul" for n in graph.node)
    assert softmax[0] in find_fp32_islands(onnx.load(str(path))).tail  # decoded in float32
    boxes, scores = ort.InferenceSession(str(path)).run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected_boxes, expected_scores = model.decode(model(images))
    torch.testing.assert_close(torch.from_numpy(boxes), expected_boxes, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(torch.from_numpy(scores), expected_scores, rtol=1e-4, atol=1e-5)
