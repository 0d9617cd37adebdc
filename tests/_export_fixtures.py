"""Shared helpers of the export tests: tiny random-weight checkpoints and the coco128 images."""

from __future__ import annotations

from pathlib import Path

import pytest
from _data_paths import SKIP_REASON, find_coco128

COCO128 = find_coco128()
CLASSES = ["circle", "square", "triangle"]


def coco128(split: str = "val2017") -> Path:
    """The coco128 image folder, or skip the test when it is absent."""
    if COCO128 is None:
        pytest.skip(SKIP_REASON)
    return COCO128 / "images" / split


def make_checkpoint(
    path: Path,
    *,
    depth: int = 18,
    channels: int = 64,
    convs: int = 2,
    cls_bias: float | None = None,
    box_bias: float | None = None,
    config_depth: int | None = None,
    seed: int = 0,
) -> Path:
    """A random-weight FCOS checkpoint (narrow head so tests stay fast on a CPU).

    Args:
        cls_bias: set the classification bias (0.0 gives scores ~0.25, so NMS has work to do).
        box_bias: set the box regression bias (distances in strides; random weights otherwise
            give near-empty boxes).
        config_depth: write another depth into the config than the weights have (mismatch test).
    """
    import torch

    from pgd_deploy.checkpoint import save_checkpoint
    from pgd_deploy.config import DataConfig, ModelConfig, TrainJob, to_dict
    from pgd_deploy.models import build_detector

    torch.manual_seed(seed)
    model_cfg = ModelConfig(depth=depth, fpn_channels=channels, head_convs=convs, num_classes=3)
    model = build_detector(model_cfg, num_classes=3)
    if cls_bias is not None:
        with torch.no_grad():
            model.head.cls_logits.bias.fill_(cls_bias)
    if box_bias is not None:
        with torch.no_grad():
            model.head.bbox_pred.bias.fill_(box_bias)
    saved_cfg = ModelConfig(
        depth=config_depth or depth, fpn_channels=channels, head_convs=convs, num_classes=3
    )
    job = TrainJob(model=saved_cfg, data=DataConfig(min_size=128, max_size=128, shapes_size=96))
    state = {"model": model.state_dict(), "config": to_dict(job), "classes": CLASSES}
    return save_checkpoint({**state, "category_ids": [1, 2, 3], "iteration": 7}, path)
