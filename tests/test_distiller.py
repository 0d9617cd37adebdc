"""Tests of pgd_deploy.distill.distiller: a full PGD step, the masks it builds (PGD and gt_box,
swap_xy), its group size, building it from a config, its defaults and argument checks. The
per-level KD terms are in test_distiller_losses.py, the mask-jitter generator in
test_distiller_jitter.py."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from _distiller_helpers import KD_KEYS, LEVELS, gt_targets
from _models import narrow_fcos, r18_fcos

from pgd_deploy.config import DistillConfig
from pgd_deploy.distill import (
    Distiller,
    background_mask,
    build_distiller,
    gt_box_masks,
    kd_loss_weights,
    pgw_mask,
    quality_score,
)
from pgd_deploy.engine import weighted_sum
from pgd_deploy.models.fcos import flatten_levels


def test_full_distillation_step_updates_only_the_student(caplog) -> None:
    teacher, student = narrow_fcos(seed=1), narrow_fcos(seed=2)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    distiller = Distiller(teacher=teacher, generator=torch.Generator().manual_seed(0))
    teacher.train()  # e.g. an engine calling model.train() on everything: eval is re-applied
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.01)
    images = torch.randn(2, 3, 96, 96)

    student.train()
    outputs = student(images)
    with caplog.at_level(logging.INFO, logger="pgd_deploy.distill.distiller"):
        kd = distiller(images, outputs, gt_targets())
    losses = {**student.loss(outputs, gt_targets()), **kd}
    total = weighted_sum(losses, distiller.loss_weights)
    optimizer.zero_grad()
    total.backward()
    optimizer.step()

    assert list(kd) == KD_KEYS
    assert all(torch.isfinite(v) and v.dim() == 0 for v in kd.values())
    assert all(kd[f"kd_cls_bg_p{level}"].item() > 0 for level in LEVELS)  # bg everywhere
    assert all(kd[f"kd_cls_att_p{level}"].item() > 0 for level in LEVELS)
    assert kd["kd_cls_fg_p3"].item() > 0 and kd["kd_reg_feat_p3"].item() > 0  # top-K on P3
    assert "groups of 2" in caplog.text  # batch 2, mask_group 4 -> groups of 2, logged
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert any(k.startswith("head.towers.cls_tower.0") for k in changed)
    assert any(k.startswith("backbone.body.") for k in changed)


def test_distiller_masks_match_the_public_functions() -> None:
    teacher = narrow_fcos(seed=1)
    distiller = Distiller(teacher=teacher, jitter=0.0, topk=9)
    images = torch.randn(2, 3, 96, 96)
    outputs = distiller.teacher_forward(images)
    fg_cls, fg_reg, bg = distiller.masks(outputs, gt_targets())
    num_locations = sum(h * w for h, w in teacher.feature_sizes(outputs))
    assert fg_cls.shape == fg_reg.shape == bg.shape == (2, num_locations)
    centers, _ = teacher.points(outputs)
    boxes = teacher.decode_boxes(outputs)
    logits = flatten_levels(outputs.cls_logits)
    for i, target in enumerate(gt_targets()):
        for xi, mask in ((0.8, fg_cls), (0.6, fg_reg)):
            q = quality_score(logits[i], boxes[i], target["boxes"], target["labels"], xi)
            torch.testing.assert_close(mask[i], pgw_mask(q, centers, target["boxes"], 9, 0.0))
        torch.testing.assert_close(bg[i], background_mask(centers, target["boxes"]))
    assert (fg_cls > 0).any() and (bg == 0).any()


def test_distiller_no_gt_and_student_equal_teacher() -> None:
    teacher = narrow_fcos(seed=1)
    distiller = Distiller(teacher=teacher, mask_group=None)
    images = torch.randn(2, 3, 64, 64)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    # Same weights: identical taps, so every term (features and attention) is zero.
    student = narrow_fcos(seed=1).eval()  # eval: BatchNorm uses the same statistics as the teacher
    kd = distiller(images, student(images), empty)
    assert all(v.item() == 0.0 for v in kd.values())
    # Another student, no GT: cls losses are background-only and finite, reg losses exactly 0
    # yet graph-connected.
    student = narrow_fcos(seed=2)
    kd = distiller(images, student(images), empty)
    assert all(kd[f"kd_cls_bg_p{level}"].item() > 0 for level in LEVELS)
    assert all(kd[f"kd_cls_fg_p{level}"].item() == 0 for level in LEVELS)
    assert all(kd[f"kd_reg_{t}_p{level}"].item() == 0 for level in LEVELS for t in ("feat", "att"))
    sum(kd.values()).backward()
    assert student.head.towers.cls_tower[0][0].weight.grad is not None


def test_distiller_group_size_resolution() -> None:
    distiller = Distiller(teacher=r18_fcos(), mask_group=4)
    assert [distiller._group_size(b) for b in (1, 2, 3, 4, 6, 8, 9)] == [1, 2, 3, 4, 3, 4, 3]
    assert Distiller(teacher=r18_fcos(), mask_group=None)._group_size(6) is None


def test_distiller_rejects_mismatched_taps() -> None:
    distiller = Distiller(teacher=narrow_fcos())
    student = narrow_fcos()
    with pytest.raises(ValueError, match="cls_taps"):
        distiller(torch.randn(2, 3, 64, 64), student(torch.randn(2, 3, 96, 96)), gt_targets())


def test_build_distiller_inits_student(r18_checkpoint: Path) -> None:
    student = r18_fcos(seed=5)
    cfg = DistillConfig(
        teacher=str(r18_checkpoint), topk=9, mask_group=None, teacher_score="detection"
    )
    distiller = build_distiller(cfg, student, device="cpu")
    assert distiller.topk == 9 and distiller.mask_group is None
    assert distiller.teacher_score == "detection"
    assert torch.equal(student.head.cls_logits.weight, distiller.teacher.head.cls_logits.weight)
    cfg = dataclasses.replace(cfg, init_student=False)
    fresh = r18_fcos(seed=6)
    build_distiller(cfg, fresh, device="cpu")
    assert not torch.equal(
        fresh.head.towers.cls_tower[0][0].weight,
        distiller.teacher.head.towers.cls_tower[0][0].weight,
    )
    with pytest.raises(ValueError, match="distill.teacher"):
        build_distiller(DistillConfig(), student, device="cpu")


# --------------------------------------------------------------------------------------------
# Mask sources: gt_box masks and the swapped inside test
# --------------------------------------------------------------------------------------------


def test_gt_box_masks_are_the_boxes_not_the_teacher_predictions() -> None:
    # distill.masks = "gt_box" (the FGD-style ablation): fg = 1 at every centre strictly inside
    # a GT box, bg its complement; whatever the teacher predicts, the masks stay the same.
    images = torch.randn(2, 3, 96, 96)
    masks = []
    for seed in (1, 2):
        distiller = Distiller(teacher=narrow_fcos(seed=seed), mask_source="gt_box")
        masks.append(distiller.masks(distiller.teacher_forward(images), gt_targets()))
    (fg_cls, fg_reg, bg), other = masks
    for a, b in zip((fg_cls, fg_reg, bg), other, strict=True):
        assert torch.equal(a, b)
    centers, _ = narrow_fcos().points(distiller.teacher_forward(images))
    for i, target in enumerate(gt_targets()):
        inside = 1.0 - background_mask(centers, target["boxes"])
        assert torch.equal(fg_cls[i], inside) and torch.equal(fg_reg[i], inside)
        assert torch.equal(bg[i], 1.0 - inside)
    pgd = Distiller(teacher=narrow_fcos(seed=1), jitter=0.0)
    pgd_fg, _, pgd_bg = pgd.masks(pgd.teacher_forward(images), gt_targets())
    assert torch.equal(pgd_bg, bg) and (fg_cls > 0).sum() > (pgd_fg > 0).sum()
    fg, bg = gt_box_masks(centers, [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert (fg == 0).all() and (bg == 1).all() and fg.shape == (2, centers.shape[0])
    with pytest.raises(ValueError, match="distill.masks must be 'pgd' or 'gt_box', got 'x'"):
        Distiller(teacher=narrow_fcos(), mask_source="x")


def test_build_distiller_passes_the_mask_source_on(r18_checkpoint: Path) -> None:
    cfg = DistillConfig(teacher=str(r18_checkpoint), masks="gt_box")
    assert build_distiller(cfg, r18_fcos(seed=5), device="cpu").mask_source == "gt_box"
    assert DistillConfig().masks == Distiller(teacher=narrow_fcos()).mask_source == "pgd"


def test_swap_xy_on_a_non_square_image_drops_objects_right_of_the_height() -> None:
    # distill.swap_xy reads each centre (x, y) as (y, x), as the official FCOS inside test does.
    # On a 64 x 160 (H x W) image every y is below 64, so an object at x in [100, 150] never
    # contains a transposed centre: it gets no foreground and counts as background everywhere.
    images = torch.randn(1, 3, 64, 160)
    target = [{"boxes": torch.tensor([[100.0, 8, 150, 56]]), "labels": torch.tensor([1])}]
    masks = {}
    for swap in (False, True):
        distiller = Distiller(teacher=narrow_fcos(seed=1), jitter=0.0, swap_xy=swap)
        outputs = distiller.teacher_forward(images)
        masks[swap] = distiller.masks(outputs, target)
    centers, _ = narrow_fcos().points(outputs)
    inside = (centers[:, 0] > 100) & (centers[:, 0] < 150) & (centers[:, 1] > 8)
    inside &= centers[:, 1] < 56
    fg_cls, fg_reg, bg = masks[False]
    assert (fg_cls[0] > 0).any() and (fg_reg[0] > 0).any()
    assert ((fg_cls[0] > 0) <= inside).all() and torch.equal(bg[0], (~inside).float())
    fg_cls, fg_reg, bg = masks[True]
    assert (fg_cls == 0).all() and (fg_reg == 0).all() and (bg == 1).all()


# --------------------------------------------------------------------------------------------
# Defaults and argument checks (survivors of `make mutate`)
# --------------------------------------------------------------------------------------------


def test_distiller_defaults_are_the_config_defaults() -> None:
    distiller, cfg = Distiller(teacher=narrow_fcos()), DistillConfig()
    for name in ("temperature", "topk", "xi_cls", "xi_reg"):
        assert getattr(distiller, name) == getattr(cfg, name), name
    assert distiller.loss_weights == kd_loss_weights(cfg, 5)
    assert distiller.mask_group == cfg.mask_group
    assert distiller.jitter == cfg.jitter == 0.05 and distiller.swap_xy is cfg.swap_xy is False
    assert distiller.teacher_score == cfg.teacher_score == "class"  # the official code's score


def test_distiller_argument_checks() -> None:
    teacher = narrow_fcos()
    assert Distiller(teacher=teacher, topk=1, mask_group=1).topk == 1  # the smallest valid values
    with pytest.raises(ValueError, match="^distill.topk must be >= 1, got 0$"):
        Distiller(teacher=teacher, topk=0)
    with pytest.raises(ValueError, match="^distill.mask_group must be None or >= 1, got 0$"):
        Distiller(teacher=teacher, mask_group=0)
    with pytest.raises(ValueError, match="^distill.teacher_score must be 'class' or 'detection'"):
        Distiller(teacher=teacher, teacher_score="joint")
    four_levels = kd_loss_weights(DistillConfig(level_weights=(1.0, 2.0, 3.0, 4.0)))
    with pytest.raises(ValueError, match=r"missing \['kd_cls_fg_p7', .*\], unexpected \[\]$"):
        Distiller(teacher=teacher, loss_weights=four_levels)
    with pytest.raises(ValueError, match=r"levels: missing \[\], unexpected \['kd_x'\]$"):
        Distiller(teacher=teacher, loss_weights={**kd_loss_weights(DistillConfig()), "kd_x": 1})
    distiller = Distiller(teacher=teacher)
    outputs = narrow_fcos()(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"B = len\(targets\) = 2, got \(3, 64, 64\)$"):
        distiller(torch.randn(3, 64, 64), outputs, gt_targets())
    with pytest.raises(ValueError, match=r"B = len\(targets\) = 1, got \(2, 3, 64, 64\)$"):
        distiller(torch.randn(2, 3, 64, 64), outputs, gt_targets()[:1])


def test_uneven_group_is_logged_once_per_batch_size(caplog) -> None:
    distiller = Distiller(teacher=narrow_fcos(), mask_group=4)
    with caplog.at_level(logging.INFO, logger="pgd_deploy.distill.distiller"):
        assert [distiller._group_size(b) for b in (6, 6, 3, 8)] == [3, 3, 3, 4]
    assert caplog.text.count("batch of 6 images") == 1 and caplog.text.count("batch of 3") == 1
    assert "batch of 8" not in caplog.text  # divisible: nothing to say


def test_build_distiller_passes_every_setting_on(r18_checkpoint: Path) -> None:
    cfg = DistillConfig(
        teacher=str(r18_checkpoint),
        alpha=0.1,
        beta=0.2,
        gamma=0.3,
        delta=0.4,
        temperature=0.5,
        topk=7,
        xi_cls=0.7,
        xi_reg=0.4,
        level_weights=(5.0, 4.0, 3.0, 2.0, 1.0),
        mask_group=2,
        jitter=0.3,
        swap_xy=True,
    )
    distiller = build_distiller(cfg, r18_fcos(seed=5), device="cpu")
    for name in ("temperature", "topk", "xi_cls", "xi_reg"):
        assert getattr(distiller, name) == getattr(cfg, name), name
    # alpha, beta, gamma, delta and the level weights: the weights the engine applies
    assert distiller.loss_weights == kd_loss_weights(cfg)
    assert distiller.loss_weights["kd_cls_fg_p3"] == pytest.approx(5.0 * 0.1)
    assert distiller.loss_weights["kd_cls_bg_p7"] == pytest.approx(1.0 * 0.2)
    assert distiller.loss_weights["kd_reg_feat_p5"] == pytest.approx(0.3)
    assert distiller.loss_weights["kd_reg_att_p4"] == pytest.approx(0.4)
    assert distiller.mask_group == 2 and distiller.jitter == 0.3 and distiller.swap_xy is True
