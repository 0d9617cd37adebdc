"""GFL head (Generalized Focal Loss, Li et al., NeurIPS 2020), as the PGD configs use it.

The anchors and the assignment are ATSS's (one square anchor of 8 x stride per location, centred
at (j * s, i * s); `atss_assign` top-9). The classification branch predicts a joint
class-quality score trained with Quality Focal Loss (beta 2) against the IoU of each positive's
predicted box with its GT. Each box side (l, t, r, b, from the anchor centre) is a distribution
over reg_max + 1 bins (16 + 1), trained with Distribution Focal Loss (weight 0.25); its expected
value (`integral_decode`) times the level's stride is the side in pixels. The box loss is GIoU
(weight 2). Box and DFL losses of each positive are weighted by its highest predicted class
score, and normalised by the sum of those weights (MMDetection's GFLHead).

There is no separate quality branch: the test score, and PGD's teacher score, is sigmoid(cls).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from pgd_deploy.distributed import reduce_mean
from pgd_deploy.models.atss import aligned_iou, anchor_priors, atss_targets
from pgd_deploy.models.heads import DenseHead, DenseOutputs, Priors, flatten_levels
from pgd_deploy.models.towers import Scale, Towers, class_predictor, predictor

DFL_EPS = 0.01  # MMDetection's bbox2distance: targets clamped to [0, reg_max - 0.01]


def quality_focal_loss(
    logits: Tensor, labels: Tensor, scores: Tensor, *, beta: float = 2.0
) -> Tensor:
    """Quality Focal Loss of every sample, summed over classes.

    Every class is a binary target: 0 for all classes of a negative and for the other classes
    of a positive, the IoU score `scores[n]` for the positive's class. The BCE of each class is
    scaled by |target - sigmoid(logit)| ** beta.

    Args:
        logits: [N, C] joint class-quality logits.
        labels: [N] integer class of each sample; C (or any value outside [0, C)) is background.
        scores: [N] the quality target of each positive in [0, 1] (ignored for negatives).
        beta: the focusing exponent.

    Returns:
        [N] the loss of each sample (same dtype as `logits`).
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1] or scores.shape != labels.shape:
        raise ValueError(
            f"quality_focal_loss: logits [N, C], labels [N] and scores [N], got "
            f"{tuple(logits.shape)}, {tuple(labels.shape)} and {tuple(scores.shape)}"
        )
    num_classes = logits.shape[1]
    sigmoid = logits.sigmoid()
    target = torch.zeros_like(logits)
    pos = (labels >= 0) & (labels < num_classes)
    rows = torch.nonzero(pos).squeeze(1)
    target[rows, labels[rows].long()] = scores[rows].to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * (target - sigmoid).abs().pow(beta)).sum(dim=1)


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Distribution Focal Loss: cross-entropy towards the two bins around a continuous target,
    each weighted by its nearness (target 2.3 -> 0.7 CE(bin 2) + 0.3 CE(bin 3)).

    Args:
        logits: [N, n + 1] logits of the bins 0..n.
        target: [N] in [0, n) (a target of n would need a bin n + 1).

    Returns:
        [N] the loss of each sample.
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"distribution_focal_loss: logits [N, n + 1] and target [N], got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    left = target.long()
    right = left + 1
    weight_left = right.to(target.dtype) - target
    weight_right = target - left.to(target.dtype)
    return (
        F.cross_entropy(logits, left, reduction="none") * weight_left
        + F.cross_entropy(logits, right, reduction="none") * weight_right
    )


def integral_decode(logits: Tensor, reg_max: int) -> Tensor:
    """Expected value of each side's distribution: [..., 4 (reg_max + 1)] logits (l, t, r, b
    one after the other) -> [..., 4] in bins (multiply by the stride outside).

    A softmax over the bins and a fixed projection [0, 1, ..., reg_max]: what the ONNX graph
    holds (Softmax, Mul, ReduceSum).
    """
    bins = reg_max + 1
    if logits.shape[-1] != 4 * bins:
        raise ValueError(
            f"integral_decode: the last dimension must be 4 * (reg_max + 1) = {4 * bins}, got "
            f"{logits.shape[-1]}"
        )
    prob = F.softmax(logits.reshape(*logits.shape[:-1], 4, bins), dim=-1)
    project = torch.arange(bins, dtype=prob.dtype, device=prob.device)
    # Mul and ReduceSum, not MatMul: the export keeps the decode tail, which follows the last
    # weighted layer (Conv, MatMul, ...), in float32; a MatMul would end the tail here
    return (prob * project).sum(dim=-1)


def distance_boxes(centers: Tensor, sides: Tensor) -> Tensor:
    """xyxy boxes from centres [A, 2] and sides [..., A, 4] (l, t, r, b) in the same unit."""
    return torch.cat([centers - sides[..., :2], centers + sides[..., 2:]], dim=-1)


class GFLHead(DenseHead):
    """GFL predictors on the shared towers: joint class-quality logits and, per side, a
    distribution over reg_max + 1 bins (through a learnable scale per level)."""

    name = "gfl"
    float_predictors = ("cls_logits", "bbox_pred")
    loss_weights = MappingProxyType({"loss_box": 2.0, "loss_dfl": 0.25})  # the GFL configs'
    pgd_defaults = MappingProxyType({"topk": 30, "alpha": 0.04, "beta": 0.02, "gamma": 0.064})

    def __init__(
        self,
        *,
        num_classes: int,
        channels: int = 256,
        num_convs: int = 4,
        num_levels: int = 5,
        prior_prob: float = 0.01,
        anchor_scale: float = 8.0,
        topk: int = 9,
        reg_max: int = 16,
        qfl_beta: float = 2.0,
    ) -> None:
        super().__init__()
        if reg_max < 1:
            raise ValueError(f"model.reg_max must be >= 1, got {reg_max}")
        self.num_classes = num_classes
        self.anchor_scale = anchor_scale
        self.topk = topk
        self.reg_max = reg_max
        self.qfl_beta = qfl_beta
        self.towers = Towers(channels=channels, num_convs=num_convs)
        self.cls_logits = class_predictor(channels, num_classes, prior_prob)
        self.bbox_pred = predictor(channels, 4 * (reg_max + 1))
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))

    @classmethod
    def config_kwargs(cls, cfg: Any) -> dict[str, Any]:
        return {**super().config_kwargs(cfg), "reg_max": cfg.reg_max}

    def layout(self) -> dict[str, Any]:
        return {**super().layout(), "distribution bins": self.reg_max + 1}

    def forward(self, feats: list[Tensor]) -> DenseOutputs:
        towers = self.towers(feats)
        return DenseOutputs(
            cls_logits=[self.cls_logits(x) for x in towers.cls_feats],
            box_regression=[
                scale(self.bbox_pred(x)) for scale, x in zip(self.scales, towers.reg_feats)
            ],
            quality=None,
            cls_taps=towers.cls_taps,
            reg_taps=towers.reg_taps,
        )

    def priors(
        self, feature_sizes: Sequence[tuple[int, int]], strides: Sequence[int], device: torch.device
    ) -> Priors:
        return anchor_priors(feature_sizes, strides, device, self.anchor_scale)

    def loss(
        self, outputs: DenseOutputs, priors: Priors, targets: Sequence[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """{"loss_cls": QFL / #pos, "loss_box": GIoU, "loss_dfl": DFL (mean over the 4 sides)};
        box and DFL terms weighted by each positive's highest class score and divided by the
        sum of those weights (unweighted otherwise: `loss_weights` gives 2 and 0.25). Counts
        and weight sums are averaged over processes."""
        labels, gt_boxes = atss_targets(priors, targets, self.num_classes, self.topk)
        bins = self.reg_max + 1
        cls = flatten_levels(outputs.cls_logits).float().reshape(-1, self.num_classes)
        dist = flatten_levels(outputs.box_regression).float().reshape(-1, 4 * bins)  # [B*A, 4n]
        labels, gt_boxes = labels.reshape(-1), gt_boxes.reshape(-1, 4)
        pos = torch.nonzero(labels < self.num_classes).squeeze(1)
        num_pos = reduce_mean(torch.tensor(float(pos.numel()), device=cls.device)).clamp(min=1.0)
        score = cls.new_zeros(labels.shape)
        if pos.numel() == 0:
            loss_cls = quality_focal_loss(cls, labels, score, beta=self.qfl_beta).sum() / num_pos
            zero = dist.sum() * 0  # graph-connected zero
            reduce_mean(zero.detach())  # every process joins the same collectives
            return {"loss_cls": loss_cls, "loss_box": zero, "loss_dfl": zero}
        index = pos % priors.centers.shape[0]
        strides = priors.strides[index][:, None]  # [P, 1]
        centers = priors.centers[index] / strides  # in stride units, as MMDetection
        sides = integral_decode(dist[pos], self.reg_max)  # [P, 4] bins
        pred = distance_boxes(centers, sides)
        target = gt_boxes[pos] / strides
        with torch.no_grad():
            score[pos] = aligned_iou(pred, target)
            weight = cls.sigmoid().amax(dim=1)[pos]  # [P]
        loss_cls = quality_focal_loss(cls, labels, score, beta=self.qfl_beta).sum() / num_pos
        weight_sum = reduce_mean(weight.sum()).clamp(min=1.0)
        loss_box = (generalized_box_iou_loss(pred, target, reduction="none") * weight).sum()
        sides_target = torch.cat([centers - target[:, :2], target[:, 2:] - centers], dim=1)
        sides_target = sides_target.clamp(min=0, max=self.reg_max - DFL_EPS)
        dfl = distribution_focal_loss(dist[pos].reshape(-1, bins), sides_target.reshape(-1))
        loss_dfl = (dfl.reshape(-1, 4).mean(dim=1) * weight).sum()
        return {
            "loss_cls": loss_cls,
            "loss_box": loss_box / weight_sum,
            "loss_dfl": loss_dfl / weight_sum,
        }

    def decode(self, outputs: DenseOutputs, priors: Priors) -> tuple[Tensor, Tensor]:
        return self._boxes(outputs, priors), flatten_levels(outputs.cls_logits).float().sigmoid()

    def guidance(self, outputs: DenseOutputs, priors: Priors) -> tuple[Tensor, Tensor]:
        return flatten_levels(outputs.cls_logits).float(), self._boxes(outputs, priors)

    def _boxes(self, outputs: DenseOutputs, priors: Priors) -> Tensor:
        """[B, A, 4] xyxy px: the integral of each side times its level's stride."""
        sides = integral_decode(flatten_levels(outputs.box_regression).float(), self.reg_max)
        return distance_boxes(priors.centers.float(), sides * priors.strides[:, None].float())


__all__ = [
    "GFLHead",
    "distribution_focal_loss",
    "integral_decode",
    "quality_focal_loss",
]
