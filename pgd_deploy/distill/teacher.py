"""The PGD teacher: loading it frozen, checking it against the student, initialising the student.

docs/method.md §5: the teacher runs in eval mode with `requires_grad=False`; its head
must have the student's layout (the distilled taps are compared element by element); and the
student's neck and head start from the teacher's (`init_student`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pgd_deploy.distributed import unwrap
from pgd_deploy.models import DenseDetector, load_detector

logger = logging.getLogger(__name__)

__all__ = ["check_compatible", "freeze", "init_student_from_teacher", "load_teacher"]


def freeze(model: nn.Module) -> nn.Module:
    """eval() and requires_grad=False on every parameter; returns `model`."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_teacher(
    path: str | Path, *, device: str | torch.device, default_depth: int = 101
) -> DenseDetector:
    """Load a frozen teacher detector (eval mode, requires_grad=False) onto `device`.

    Args:
        path: a checkpoint of this project ({"model": state dict, "config": TrainJob dict, ...})
            or a plain state dict of a `DenseDetector`.
        device: where the teacher runs.
        default_depth: ResNet depth when the file carries no config (`distill.teacher_depth`).

    Raises:
        ValueError: (a `CheckpointError`) the file is missing, truncated, not a checkpoint, or
            its weights do not fit the detector its config (or `default_depth`) describes; the
            message names the file.
    """
    loaded = load_detector(path, device=device, default_depth=default_depth)
    model, classes = loaded.config.model, loaded.detector.num_classes
    logger.info("teacher: %s R%d, %d classes, from %s", model.head, model.depth, classes, path)
    return freeze(loaded.detector)


def _head_layout(model: nn.Module) -> dict[str, Any]:
    detector = unwrap(model)
    if not isinstance(detector, DenseDetector):
        raise TypeError(f"expected a DenseDetector, got {type(detector).__name__}")
    return {**detector.head.layout(), "strides": tuple(detector.strides)}


def check_compatible(teacher: nn.Module, student: nn.Module) -> None:
    """Raise ValueError unless teacher and student heads share the layout the taps need.

    Compared: the heads' `layout()` (head type, classes, tower depths and width for the heads
    here) and the FPN strides.
    """
    t_layout, s_layout = _head_layout(teacher), _head_layout(student)
    diffs = [
        f"{key}: teacher {t_layout[key]} vs student {s_layout[key]}"
        for key in t_layout
        if t_layout[key] != s_layout[key]
    ]
    if diffs:
        raise ValueError(
            "teacher and student heads differ (PGD needs identical tap shapes): " + "; ".join(diffs)
        )


@torch.no_grad()
def init_student_from_teacher(
    student: nn.Module, teacher: nn.Module
) -> tuple[list[str], list[str]]:
    """Copy the teacher's FPN and head into the student where the shapes match (docs/method.md D1).

    Every teacher state-dict tensor whose name does not start with `backbone.body.` is copied
    into the student tensor of the same name and shape; the others (e.g. FPN laterals when the
    backbone widths differ) keep their initialisation.

    Returns:
        (copied names, skipped names).
    """
    student_state = unwrap(student).state_dict()
    copied, skipped = [], []
    for name, tensor in unwrap(teacher).state_dict().items():
        if name.startswith("backbone.body."):
            continue
        target = student_state.get(name)
        if target is None or target.shape != tensor.shape:
            skipped.append(name)
            continue
        target.copy_(tensor)
        copied.append(name)
    logger.info("student init from teacher: %d tensors copied", len(copied))
    if skipped:
        logger.info("student init from teacher: kept student init for %s", ", ".join(skipped))
    return copied, skipped
