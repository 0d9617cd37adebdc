"""`build_detector(cfg)`: the one place a model config becomes detector constructor kwargs."""

from __future__ import annotations

from pgd_deploy.config import ModelConfig
from pgd_deploy.models.backbone import build_backbone
from pgd_deploy.models.detector import DenseDetector
from pgd_deploy.models.fcos import FCOSHead

__all__ = ["build_detector"]


def build_detector(cfg: ModelConfig, num_classes: int | None = None) -> DenseDetector:
    """Build the detector described by `cfg` (the one place config becomes constructor kwargs).

    Args:
        cfg: model section of the config.
        num_classes: overrides `cfg.num_classes` (e.g. taken from the dataset).

    Raises:
        ValueError: unknown head, unsupported depth or no class count.
    """
    classes = num_classes or cfg.num_classes
    if classes <= 0:
        raise ValueError("model.num_classes must be > 0 (or given by the dataset)")
    if len(cfg.regress_ranges) != 4:
        raise ValueError(f"model.regress_ranges needs 4 boundaries, got {cfg.regress_ranges}")
    backbone = build_backbone(depth=cfg.depth, weights=cfg.weights, channels=cfg.fpn_channels)
    if cfg.head == "fcos":
        head = FCOSHead(num_classes=classes, channels=cfg.fpn_channels, num_convs=cfg.head_convs)
    else:
        raise ValueError(f"model.head must be 'fcos', got {cfg.head!r}")
    return DenseDetector(
        backbone=backbone,
        head=head,
        num_classes=classes,
        center_sampling_radius=cfg.center_sampling_radius,
        regress_ranges=cfg.regress_ranges,
        focal_alpha=cfg.focal_alpha,
        focal_gamma=cfg.focal_gamma,
        box_loss=cfg.box_loss,
        score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh,
        score_before_centerness=cfg.score_before_centerness,
        topk_candidates=cfg.topk_candidates,
        max_detections=cfg.max_detections,
    )
