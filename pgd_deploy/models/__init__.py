"""Detectors (torch). `build_detector(cfg)` builds the registered dense head `model.head` (FCOS,
ATSS, GFL) on a ResNet of any depth; `load_detector(path, device=...)` rebuilds the detector a
checkpoint file holds. The GFL losses and decoding are importable from here (the head's
contract)."""

from __future__ import annotations

from pgd_deploy.models.atss import ATSSHead, atss_assign
from pgd_deploy.models.build import HEADS, build_detector, register_head
from pgd_deploy.models.detector import DenseDetector
from pgd_deploy.models.fcos import FCOSHead
from pgd_deploy.models.gfl import (
    GFLHead,
    distribution_focal_loss,
    integral_decode,
    quality_focal_loss,
)
from pgd_deploy.models.heads import DenseHead, DenseOutputs, Priors
from pgd_deploy.models.loading import LoadedDetector, load_detector

__all__ = [
    "ATSSHead",
    "HEADS",
    "DenseDetector",
    "DenseHead",
    "DenseOutputs",
    "FCOSHead",
    "GFLHead",
    "LoadedDetector",
    "Priors",
    "atss_assign",
    "build_detector",
    "distribution_focal_loss",
    "integral_decode",
    "load_detector",
    "quality_focal_loss",
    "register_head",
]
