"""`distill.teacher_score`: PGD's teacher quality q = s^(1-xi) * IoU^xi from the class score
alone (s = sigmoid(cls), the official code) or from the score the teacher's detections carry
(s = class x the head's quality branch: ATSS's IoU prediction, FCOS's centerness)."""

from __future__ import annotations

import pytest
import torch

from pgd_deploy.config import ModelConfig
from pgd_deploy.distill import Distiller, pgw_mask, quality_score
from pgd_deploy.models import build_detector
from pgd_deploy.models.heads import flatten_levels, joint_logits

TARGETS = [
    {
        "boxes": torch.tensor([[8.0, 10, 70, 90], [40, 30, 120, 110]]),
        "labels": torch.tensor([0, 2]),
    },
    {"boxes": torch.tensor([[20.0, 20, 60, 50]]), "labels": torch.tensor([1])},
]


def test_joint_logits_are_the_logits_of_the_product_without_nan():
    cls = torch.linspace(-30, 30, 121, dtype=torch.float64)[:, None].expand(121, 3)
    quality = torch.linspace(-20, 25, 121, dtype=torch.float64).flip(0)[:, None]
    joint = joint_logits(cls, quality)
    torch.testing.assert_close(joint.sigmoid(), cls.sigmoid() * quality.sigmoid())
    extreme = torch.tensor([[-200.0, -50.0, 0.0, 50.0, 200.0]])
    for q in (-200.0, 0.0, 200.0):
        out = joint_logits(extreme, torch.tensor([[q]]))
        assert not out.isnan().any(), out
        torch.testing.assert_close(
            out.sigmoid(), extreme.sigmoid() * torch.sigmoid(torch.tensor(q))
        )
    assert joint_logits(torch.tensor([200.0]), torch.tensor([200.0])).item() == float("inf")


def _teacher_and_outputs(head: str):
    torch.manual_seed(1)
    cfg = ModelConfig(head=head, depth=18, fpn_channels=64, head_convs=2)
    teacher = build_detector(cfg, num_classes=3).eval()
    with torch.no_grad():
        outputs = teacher(torch.randn(2, 3, 128, 128))
    # a quality branch that varies: a fresh head's is about 0.5 everywhere and reorders nothing
    quality = [
        torch.randn(q.shape, generator=torch.Generator().manual_seed(3)) * 3
        for q in outputs.quality
    ]
    return teacher, outputs._replace(quality=quality)


@pytest.mark.parametrize("head", ["fcos", "atss"])
def test_detection_guidance_is_the_score_the_detections_carry(head):
    teacher, outputs = _teacher_and_outputs(head)
    _, scores = teacher.decode(outputs)
    logits, boxes, _ = teacher.guidance(outputs, with_quality=True)
    torch.testing.assert_close(logits.sigmoid(), scores, rtol=1e-5, atol=1e-7)
    plain, plain_boxes, _ = teacher.guidance(outputs)
    torch.testing.assert_close(plain, flatten_levels(outputs.cls_logits), rtol=0, atol=0)
    torch.testing.assert_close(plain_boxes, boxes, rtol=0, atol=0)


@pytest.mark.parametrize("head", ["fcos", "atss"])
def test_the_distiller_masks_follow_the_teacher_score(head):
    teacher, outputs = _teacher_and_outputs(head)
    boxes, detection = teacher.decode(outputs)
    centers = teacher.priors(outputs).centers
    masks = {}
    for name, score in (
        ("class", flatten_levels(outputs.cls_logits).sigmoid()),
        ("detection", detection),
    ):
        distiller = Distiller(
            teacher=teacher, jitter=0.0, topk=9, mask_group=None, teacher_score=name
        )
        fg_cls, fg_reg, _ = distiller.masks(outputs, TARGETS)
        for i, target in enumerate(TARGETS):
            for xi, mask in ((0.8, fg_cls), (0.6, fg_reg)):
                logit = torch.logit(score[i].double())  # the reference: from the decoded scores
                q = quality_score(logit, boxes[i].double(), target["boxes"], target["labels"], xi)
                expected = pgw_mask(q, centers.double(), target["boxes"], 9, 0.0).float()
                torch.testing.assert_close(mask[i], expected, rtol=1e-4, atol=1e-5)
        masks[name] = fg_cls
    assert not torch.allclose(masks["class"], masks["detection"])  # the branch moved the masks
