"""Shared by the distiller tests (test_distiller*.py): the ground truth of their two-image batch
and the names of the distiller's KD terms."""

from __future__ import annotations

import torch

LEVELS = range(3, 8)  # P3-P7
KD_KEYS = [  # the distiller's terms, in its order: level by level, five terms each
    f"kd_{term}_p{level}"
    for level in LEVELS
    for term in ("cls_fg", "cls_bg", "cls_att", "reg_feat", "reg_att")
]


def gt_targets() -> list[dict[str, torch.Tensor]]:
    """Targets of a batch of two images of at least 96 px: two GT boxes on the first, one on the
    second, of three classes."""
    return [
        {
            "boxes": torch.tensor([[8.0, 10, 70, 90], [40, 30, 120, 110]]),
            "labels": torch.tensor([0, 2]),
        },
        {"boxes": torch.tensor([[20.0, 20, 60, 50]]), "labels": torch.tensor([1])},
    ]
