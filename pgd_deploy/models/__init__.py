"""Detectors (torch). `build_detector(cfg)` builds the registered dense head `model.head` (FCOS,
ATSS) on a ResNet of any depth; `load_detector(path, device=...)` rebuilds the detector a
checkpoint file holds."""

from __future__ import annotations

from pgd_deploy.models.atss import ATSSHead, atss_assign
from pgd_deploy.models.build import HEADS, build_detector, register_head
from pgd_deploy.models.detector import DenseDetector
from pgd_deploy.models.fcos import FCOSHead
from pgd_deploy.models.heads import DenseHead, DenseOutputs, Priors
from pgd_deploy.models.loading import LoadedDetector, load_detector

__all__ = [
    "ATSSHead",
    "HEADS",
    "DenseDetector",
    "DenseHead",
    "DenseOutputs",
    "FCOSHead",
    "LoadedDetector",
    "Priors",
    "atss_assign",
    "build_detector",
    "load_detector",
    "register_head",
]
