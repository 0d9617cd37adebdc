"""Detectors (torch). `build_detector(cfg)` builds FCOS on a ResNet of any depth;
`load_detector(path, device=...)` rebuilds the detector a checkpoint file holds."""

from __future__ import annotations

from pgd_deploy.models.build import build_detector
from pgd_deploy.models.detector import DenseDetector
from pgd_deploy.models.fcos import FCOSHead, HeadOutputs
from pgd_deploy.models.loading import LoadedDetector, load_detector

__all__ = [
    "DenseDetector",
    "FCOSHead",
    "HeadOutputs",
    "LoadedDetector",
    "build_detector",
    "load_detector",
]
