"""Prediction-Guided Distillation (PGD, ECCV 2022): masks, losses and the distiller (torch).

Shape letters used throughout this package:

- B: batch (images); N in the loss functions, the images of one (per-GPU) batch.
- L: FPN levels (P3..P7).
- A: all locations of all levels of ONE image, concatenated with P3 first.
- P: points (locations) selected by a mask.
- G: ground-truth boxes of one image.
- C: classes.
- Ch: feature channels of a tap (256).
- K: top-k key predictive locations per ground truth.
- H, W: height and width of one level's feature map.

Boxes are absolute-pixel xyxy, centres are (x, y) pixels, labels are 0-based class indices.
The five functions below are the public contract described in docs/method.md §3.
"""

from __future__ import annotations

from pgd_deploy.distill.distiller import (
    Distiller,
    build_distiller,
    jitter_generator,
    kd_loss_weights,
    kd_term_names,
)
from pgd_deploy.distill.losses import cls_distill_loss, reg_distill_loss
from pgd_deploy.distill.masks import background_mask, gt_box_masks, pgw_mask, quality_score
from pgd_deploy.distill.teacher import check_compatible, init_student_from_teacher, load_teacher

__all__ = [
    "Distiller",
    "background_mask",
    "build_distiller",
    "check_compatible",
    "cls_distill_loss",
    "gt_box_masks",
    "init_student_from_teacher",
    "jitter_generator",
    "kd_loss_weights",
    "kd_term_names",
    "load_teacher",
    "pgw_mask",
    "quality_score",
    "reg_distill_loss",
]
