"""Shared model builders of the tests: seeded random-weight R18 FCOS detectors, 3 classes unless
told. `r18_fcos` has the default head (256-channel FPN, 4-conv towers); `narrow_fcos` the cheap
one most tests use (`NARROW`: 64-channel FPN, 2-conv towers). The `r18_checkpoint` fixture of
conftest saves `r18_fcos(seed=1)` as a project checkpoint."""

from __future__ import annotations

import torch

from pgd_deploy.config import ModelConfig
from pgd_deploy.models import build_detector

NARROW = ModelConfig(depth=18, fpn_channels=64, head_convs=2)


def r18_fcos(*, num_classes: int = 3, seed: int = 0) -> torch.nn.Module:
    """R18 FCOS with the default FPN and head, its weights drawn after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return build_detector(ModelConfig(depth=18), num_classes=num_classes)


def narrow_fcos(*, num_classes: int = 3, seed: int = 0) -> torch.nn.Module:
    """R18 FCOS with a 64-channel FPN and 2-conv towers (`NARROW`): the cheap model of the tests."""
    torch.manual_seed(seed)
    return build_detector(NARROW, num_classes=num_classes)
