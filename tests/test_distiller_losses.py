"""Tests of pgd_deploy.distill.distiller's per-level KD terms and their weights
(`kd_loss_weights`): weighted by the engine, level N's five terms are the public
`cls_distill_loss` + `reg_distill_loss` of level N, in value and in gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _distiller_helpers import KD_KEYS, LEVELS, gt_targets
from _models import narrow_fcos

from pgd_deploy.config import DistillConfig
from pgd_deploy.distill import (
    Distiller,
    cls_distill_loss,
    kd_loss_weights,
    kd_term_names,
    reg_distill_loss,
)
from pgd_deploy.engine import weighted_sum


def _level_inputs(distiller: Distiller, teacher_outputs, student_outputs, level: int):
    """(student cls tap, teacher cls tap, cls mask, bg mask, student reg tap, teacher reg tap,
    reg mask) of one level, cut from the distiller's [B, A] masks by hand."""
    fg_cls, fg_reg, bg = distiller.masks(teacher_outputs, gt_targets())
    sizes = distiller.teacher.feature_sizes(teacher_outputs)
    start = sum(h * w for h, w in sizes[:level])
    h, w = sizes[level]
    cls_mask, reg_mask, bg_mask = (
        m[:, start : start + h * w].reshape(-1, h, w) for m in (fg_cls, fg_reg, bg)
    )
    return (
        student_outputs.cls_taps[level],
        teacher_outputs.cls_taps[level],
        cls_mask,
        bg_mask,
        student_outputs.reg_taps[level],
        teacher_outputs.reg_taps[level],
        reg_mask,
    )


def test_weighted_terms_are_the_public_losses_level_by_level() -> None:
    """Weighted by `kd_loss_weights`, the five terms of level N add up to cls_distill_loss +
    reg_distill_loss of level N's taps and masks, with level N's weight (P3 the first, P7 the
    last): the engine's total is the old total, and no level weight is applied to another level."""
    cfg = DistillConfig(alpha=0.04, beta=0.02, gamma=0.064, delta=0.0008)
    teacher, student = narrow_fcos(seed=1), narrow_fcos(seed=2)
    weights = kd_loss_weights(cfg, 5)
    distiller = Distiller(teacher=teacher, loss_weights=weights, jitter=0.0, mask_group=None)
    images = torch.randn(2, 3, 96, 96)
    outputs = student(images)
    kd = distiller(images, outputs, gt_targets())
    teacher_outputs = distiller.teacher_forward(images)
    expected = []
    for level in range(5):
        s_cls, t_cls, cls_mask, bg_mask, s_reg, t_reg, reg_mask = _level_inputs(
            distiller, teacher_outputs, outputs, level
        )
        common = {"temperature": cfg.temperature, "delta": cfg.delta}
        cls = cls_distill_loss(
            s_cls,
            t_cls,
            cls_mask,
            bg_mask,
            alpha=cfg.alpha,
            beta=cfg.beta,
            level_weight=cfg.level_weights[level],
            **common,
        )
        reg = reg_distill_loss(s_reg, t_reg, reg_mask, gamma=cfg.gamma, **common)
        name = f"p{level + 3}"
        level_terms = {k: v for k, v in kd.items() if k.endswith(name)}
        torch.testing.assert_close(weighted_sum(level_terms, weights), cls + reg, rtol=1e-6, atol=0)
        expected.append(cls + reg)
    torch.testing.assert_close(weighted_sum(kd, weights), sum(expected), rtol=1e-6, atol=0)
    assert kd["kd_cls_fg_p7"] > 0 and kd["kd_cls_bg_p7"] > 0  # P7's weight 2.0 is exercised


def test_weighted_terms_give_the_public_losses_gradients_bit_for_bit() -> None:
    """The engine's weights (float32-rounded products) reproduce the gradients the public
    float32 losses give, exactly: training is unchanged by moving the weights to the engine."""
    cfg = DistillConfig()
    teacher = narrow_fcos(seed=1)
    distiller = Distiller(
        teacher=teacher, loss_weights=kd_loss_weights(cfg, 5), jitter=0.0, mask_group=2
    )
    images = torch.randn(2, 3, 64, 64)
    teacher_outputs = distiller.teacher_forward(images)
    grads = []
    for use_terms in (True, False):
        student = narrow_fcos(seed=2)
        outputs = student(images)
        if use_terms:
            total = weighted_sum(distiller(images, outputs, gt_targets()), distiller.loss_weights)
        else:
            total = 0
            for level in range(5):
                s_cls, t_cls, cls_mask, bg_mask, s_reg, t_reg, reg_mask = _level_inputs(
                    distiller, teacher_outputs, outputs, level
                )
                total = total + cls_distill_loss(
                    s_cls,
                    t_cls,
                    cls_mask,
                    bg_mask,
                    temperature=cfg.temperature,
                    alpha=cfg.alpha,
                    beta=cfg.beta,
                    delta=cfg.delta,
                    level_weight=cfg.level_weights[level],
                    mask_group=2,
                )
                total = total + reg_distill_loss(
                    s_reg,
                    t_reg,
                    reg_mask,
                    temperature=cfg.temperature,
                    gamma=cfg.gamma,
                    delta=cfg.delta,
                )
        total.backward()
        grads.append([p.grad.clone() for p in student.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_kd_loss_weights_put_each_weight_on_its_own_term() -> None:
    cfg = DistillConfig(
        alpha=2.0, beta=3.0, gamma=5.0, delta=7.0, level_weights=(1.0, 10.0, 100.0, 1e3, 1e4)
    )
    weights = kd_loss_weights(cfg, 5)
    assert list(weights) == kd_term_names(5) == KD_KEYS
    for level, level_weight in zip(LEVELS, cfg.level_weights, strict=True):
        assert weights[f"kd_cls_fg_p{level}"] == level_weight * 2.0
        assert weights[f"kd_cls_bg_p{level}"] == level_weight * 3.0
        assert weights[f"kd_cls_att_p{level}"] == 7.0
        assert weights[f"kd_reg_feat_p{level}"] == 5.0
        assert weights[f"kd_reg_att_p{level}"] == 7.0
    # float32 rounding of the product, as the float32 loss computes lambda_l * (alpha * L)
    assert kd_loss_weights(DistillConfig(), 5)["kd_cls_fg_p4"] == float(
        np.float32(1.25) * np.float32(0.04)
    )
    with pytest.raises(ValueError, match=r"one weight per level \(5\), got \(1.0, 2.0\)$"):
        kd_loss_weights(DistillConfig(level_weights=(1.0, 2.0)), 5)
