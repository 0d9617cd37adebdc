"""Shared classification/regression towers of dense heads, and the pieces every head builds on
(a learnable per-level `Scale`, the `predictor` conv).

Each tower is `num_convs` x [3x3 conv, GroupNorm(32), ReLU], shared across FPN levels. The output
of the first block of each tower is returned explicitly per level: it is the PGD tap point
(docs/method.md §2), so no forward hooks are needed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn


class TowerOutputs(NamedTuple):
    """Per-level tower features; every entry is a list over levels of [B, C, H_l, W_l]."""

    cls_feats: list[Tensor]  # last block of the classification tower
    reg_feats: list[Tensor]  # last block of the regression tower
    cls_taps: list[Tensor]  # first block of the classification tower (PGD tap)
    reg_taps: list[Tensor]  # first block of the regression tower (PGD tap)


def _block(channels: int) -> nn.Sequential:
    conv = nn.Conv2d(channels, channels, 3, padding=1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.GroupNorm(32, channels), nn.ReLU(inplace=True))


class Towers(nn.Module):
    """Two parallel towers over every level."""

    def __init__(self, *, channels: int, num_convs: int) -> None:
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"model.head_convs must be >= 1, got {num_convs}")
        self.cls_tower = nn.ModuleList(_block(channels) for _ in range(num_convs))
        self.reg_tower = nn.ModuleList(_block(channels) for _ in range(num_convs))

    @staticmethod
    def _run(tower: nn.ModuleList, x: Tensor) -> tuple[Tensor, Tensor]:
        tap = tower[0](x)
        out = tap
        for block in tower[1:]:
            out = block(out)
        return tap, out

    def forward(self, feats: list[Tensor]) -> TowerOutputs:
        out = TowerOutputs([], [], [], [])
        for x in feats:
            cls_tap, cls_feat = self._run(self.cls_tower, x)
            reg_tap, reg_feat = self._run(self.reg_tower, x)
            out.cls_taps.append(cls_tap)
            out.cls_feats.append(cls_feat)
            out.reg_taps.append(reg_tap)
            out.reg_feats.append(reg_feat)
        return out


class Scale(nn.Module):
    """A learnable scalar per level, multiplying its box regression (FCOS, ATSS)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def predictor(channels: int, out: int, bias: float = 0.0) -> nn.Conv2d:
    """A head's final 3x3 prediction conv: weights N(0, 0.01), constant bias."""
    conv = nn.Conv2d(channels, out, 3, padding=1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.constant_(conv.bias, bias)
    return conv


def class_predictor(channels: int, num_classes: int, prior_prob: float) -> nn.Conv2d:
    """The classification `predictor` with the focal-loss prior: its bias makes every initial
    class score sigmoid(bias) = `prior_prob` (RetinaNet; FCOS, ATSS and GFL use 0.01)."""
    return predictor(channels, num_classes, -math.log((1 - prior_prob) / prior_prob))
