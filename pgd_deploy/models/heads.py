"""The dense-head protocol: what a one-stage head provides to the detector, the trainer, PGD,
QAT and the export, so that none of them asks which head it holds.

A head is an `nn.Module` subclass of `DenseHead`, registered under its config name
(`model.head`) in `pgd_deploy.models.build.HEADS`. Shapes below: B images, C classes, L = 5 FPN
levels P3..P7 of H_l x W_l locations, A = sum_l H_l * W_l locations (one prior per location for
every head here: a point for anchor-free heads, one square anchor for anchor-based ones), all
levels concatenated in level order, rows before columns.

What each head provides (docs/method.md, "The head protocol"):

- `forward(feats)`: FPN features [B, F, H_l, W_l] per level -> `DenseOutputs`, the raw
  per-level predictions and the two tap features PGD distils (the output of the first conv
  block of each tower);
- `priors(feature_sizes, strides, device)`: the location priors (`Priors`): centres, strides
  and, for anchor-based heads, anchor sizes: what target assignment, decoding and PGD's
  prediction-guided weighting (PGW: points for FCOS and AutoAssign, anchor centres and sizes
  for ATSS, GFL and DDOD) need;
- `loss(outputs, priors, targets)`: its own target assignment and losses, as named unweighted
  terms (`loss_cls`, `loss_box`, ...; the trainer weights and sums them); `loss_weights` holds
  the head's own weights of those terms (e.g. ATSS's GIoU weight 2; absent names weigh 1), which
  the trainer multiplies with the distiller's and `train.loss_weights`; `pgd_defaults` holds the
  `distill` values PGD uses with this head where the recipe does not set them (K, alpha, ...);
- `decode(outputs, priors)`: the fixed export contract, boxes [B, A, 4] xyxy pixels of the
  network input and per-class scores [B, A, C] in [0, 1] (what is exported, served, evaluated);
- `guidance(outputs, priors)`: what PGD's teacher quality q = sigmoid(s)^(1-xi) * IoU(b, g)^xi
  is computed from: the per-location class logits s [B, A, C] (the joint quality logit for GFL;
  the head never multiplies its centerness or IoU branch in: `joint_logits` does, for the
  detector, when `distill.teacher_score = "detection"`) and the decoded boxes b [B, A, 4]
  pixels;
- `float_predictors`: the names of its final prediction convs (relative to the head), which
  quantization-aware training keeps in floating point;
- `config_kwargs(cfg)`: the constructor arguments the model config gives it (beyond
  `num_classes`), so that the builder never names a head's own keys;
- `layout()`: what must be equal between a PGD teacher and its student for their taps to be
  compared element by element (checked before training starts).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class DenseOutputs(NamedTuple):
    """Raw outputs of a dense head, each a list over levels P3..P7.

    Attributes:
        cls_logits: [B, C, H_l, W_l] class logits (GFL: the joint class-quality logits).
        box_regression: [B, R, H_l, W_l] the head's own box encoding (R = 4 for distances or
            deltas; 4 * (reg_max + 1) for GFL's distributions); `decode` turns it into pixels.
        quality: [B, 1, H_l, W_l] logits of a separate quality branch (FCOS centerness, ATSS and
            DDOD IoU), multiplied into the scores at test time; None when the head has none.
        cls_taps, reg_taps: [B, F, H_l, W_l] the output of the first conv block of the
            classification and regression towers (PGD's distillation points).
    """

    cls_logits: list[Tensor]
    box_regression: list[Tensor]
    quality: list[Tensor] | None
    cls_taps: list[Tensor]
    reg_taps: list[Tensor]


@dataclass(frozen=True)
class Priors:
    """The location priors of every level, concatenated in level order (A locations).

    Attributes:
        centers: [A, 2] (x, y) pixels of the network input: the point (anchor-free heads) or the
            anchor centre (anchor-based heads).
        strides: [A] the stride of each location's level.
        sizes: [A, 2] (w, h) pixels of each location's anchor; None for anchor-free heads.
        level_sizes: locations per level (sums to A).
    """

    centers: Tensor
    strides: Tensor
    sizes: Tensor | None
    level_sizes: tuple[int, ...]

    @property
    def anchors(self) -> Tensor:
        """[A, 4] xyxy anchor boxes (anchor-based heads only)."""
        if self.sizes is None:
            raise ValueError("an anchor-free head's priors are points: it has no anchors")
        half = self.sizes / 2
        return torch.cat([self.centers - half, self.centers + half], dim=1)


class DenseHead(nn.Module, ABC):
    """Base class of every dense head (the module docstring lists the members).

    Class attributes:
        name: the `model.head` value it is registered under.
        float_predictors: final prediction convs kept in floating point by QAT, e.g.
            ("cls_logits", "bbox_pred", "centerness").
        loss_weights: the head's own weight of some of its loss terms (others weigh 1).
        pgd_defaults: the `distill` keys whose value for this head differs from the section's
            defaults (which are FCOS's), e.g. ATSS's K = 9 and alpha 0.08; a recipe or `--set`
            still wins (`config.TrainJob.head_defaults`).
    """

    name: ClassVar[str] = ""
    float_predictors: ClassVar[tuple[str, ...]] = ()
    loss_weights: ClassVar[Mapping[str, float]] = MappingProxyType({})
    pgd_defaults: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    num_classes: int

    @classmethod
    def config_kwargs(cls, cfg: Any) -> dict[str, Any]:
        """Constructor arguments from the model config (`config.ModelConfig`) besides
        `num_classes`; a head with keys of its own extends this dict."""
        return {"channels": cfg.fpn_channels, "num_convs": cfg.head_convs}

    def layout(self) -> dict[str, Any]:
        """Head type, classes, tower depths and width: what a teacher and its student share.

        The default reads the shared `towers` (`models.towers.Towers`) that every head here
        has; a head with other towers overrides it.
        """
        towers = self.towers
        return {
            "head type": type(self).__name__,
            "classes": self.num_classes,
            "cls tower depth": len(towers.cls_tower),
            "reg tower depth": len(towers.reg_tower),
            "tower width": towers.cls_tower[0][0].out_channels,
        }

    @abstractmethod
    def forward(self, feats: list[Tensor]) -> DenseOutputs:
        """FPN features [B, F, H_l, W_l] per level -> raw outputs."""

    @abstractmethod
    def priors(
        self, feature_sizes: Sequence[tuple[int, int]], strides: Sequence[int], device: torch.device
    ) -> Priors:
        """The location priors of feature maps of these (H_l, W_l) sizes and strides."""

    @abstractmethod
    def loss(
        self, outputs: DenseOutputs, priors: Priors, targets: Sequence[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Named, unweighted loss terms. `targets[i]`: {"boxes": [G, 4] xyxy pixels of the
        network input, "labels": [G] class indices}."""

    @abstractmethod
    def decode(self, outputs: DenseOutputs, priors: Priors) -> tuple[Tensor, Tensor]:
        """The export contract: boxes [B, A, 4] xyxy pixels and scores [B, A, C] in [0, 1]."""

    @abstractmethod
    def guidance(self, outputs: DenseOutputs, priors: Priors) -> tuple[Tensor, Tensor]:
        """PGD's teacher prediction: class logits [B, A, C] and decoded boxes [B, A, 4] px."""


def grid_points(
    sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    device: torch.device | str,
    *,
    half_stride: bool,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """The location grid of every level, P3 first, rows before columns: centres [A, 2] (x, y)
    at (j * s + o, i * s + o) pixels and strides [A], with o = s // 2 (`half_stride`, FCOS's
    points) or 0 (MMDetection's anchor centres and AutoAssign's points)."""
    centers, per_point = [], []
    for (h, w), s in zip(sizes, strides, strict=True):
        offset = s // 2 if half_stride else 0
        ys = torch.arange(int(h), device=device, dtype=dtype) * s + offset
        xs = torch.arange(int(w), device=device, dtype=dtype) * s + offset
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        centers.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))  # [h*w, 2]
        per_point.append(torch.full((int(h) * int(w),), float(s), device=device, dtype=dtype))
    return torch.cat(centers), torch.cat(per_point)


def flatten_levels(tensors: Sequence[Tensor]) -> Tensor:
    """Per-level [B, K, H_l, W_l] -> [B, A, K], levels concatenated in order."""
    return torch.cat([t.flatten(2).transpose(1, 2) for t in tensors], dim=1)


def joint_logits(cls_logits: Tensor, quality_logits: Tensor) -> Tensor:
    """logit(sigmoid(cls) * sigmoid(quality)): the class logits [..., C] of a score multiplied
    by a quality branch [..., 1] (FCOS centerness, ATSS IoU), computed in log space.

    sigmoid of the result gives the product back to rounding; a product that rounds to 1 gives
    +inf, whose sigmoid is exactly 1 (never NaN).
    """
    log_p = F.logsigmoid(cls_logits) + F.logsigmoid(quality_logits)  # log of the product, <= 0
    return log_p - torch.log(-torch.expm1(log_p))  # log p - log(1 - p)


__all__ = ["DenseHead", "DenseOutputs", "Priors", "flatten_levels", "grid_points", "joint_logits"]
