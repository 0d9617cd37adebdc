"""ATSS head, the IoU-branch variant the PGD configs use (docs/method.md §7; pgd_method P23).

One square anchor per location, 8 x stride wide, centred at (j * s, i * s) (MMDetection's
`center_offset=0`). Boxes are regressed as deltas (dx, dy, dw, dh) with means 0 and stds
(0.1, 0.1, 0.2, 0.2) relative to the anchor, through a learnable scale per level. Assignment is
ATSS (`atss_assign`); the losses are focal loss (gamma 2, alpha 0.25) on the classes, GIoU on the
decoded boxes of the positives (not weighted by a centerness; ATSS's weight 2 is the head's
`loss_weights`), and BCE of an IoU-prediction branch against the positives' IoU with their GT.
The test score is sigmoid(cls) x sigmoid(IoU prediction).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from pgd_deploy.distributed import reduce_mean
from pgd_deploy.models.heads import DenseHead, DenseOutputs, Priors, flatten_levels, grid_points
from pgd_deploy.models.towers import Scale, Towers, class_predictor, predictor

DELTA_STDS = (0.1, 0.1, 0.2, 0.2)  # DeltaXYWHBBoxCoder target_stds of the ATSS configs (means 0)
MAX_LOG_RATIO = abs(math.log(16.0 / 1000))  # MMDetection's clamp of dw, dh before exp
INSIDE_EPS = 0.01  # a positive's anchor centre lies inside its GT by more than this (px)


def atss_assign(
    anchors: Tensor, level_sizes: Sequence[int], gt_boxes: Tensor, *, topk: int = 9
) -> Tensor:
    """ATSS assignment of one image (Zhang et al., CVPR 2020; MMDetection's ATSSAssigner).

    For every GT, the `topk` anchors of each level whose centres are nearest to the GT's centre
    are its candidates; those whose IoU with the GT is >= mean + std of the candidates' IoUs
    (std unbiased, as torch's) and whose centre lies inside the GT by more than 0.01 px are
    positive. An anchor positive for several GTs goes to the one it overlaps most (the lowest
    index among equals).

    Args:
        anchors: [A, 4] xyxy anchors of all levels, in level order.
        level_sizes: anchors per level (sums to A).
        gt_boxes: [G, 4] xyxy.
        topk: candidates per level and GT (fewer on a level with fewer anchors).

    Returns:
        [A] long: the index of the assigned GT, -1 for background (all -1 when G = 0).

    Raises:
        ValueError: shapes that do not fit, or `level_sizes` not summing to A.
    """
    if (
        anchors.dim() != 2
        or anchors.shape[-1] != 4
        or gt_boxes.dim() != 2
        or gt_boxes.shape[-1] != 4
    ):
        raise ValueError(
            f"atss_assign: anchors must be [A, 4] and gt_boxes [G, 4], got "
            f"{tuple(anchors.shape)} and {tuple(gt_boxes.shape)}"
        )
    sizes = [int(n) for n in level_sizes]
    if sum(sizes) != anchors.shape[0] or any(n < 0 for n in sizes):
        raise ValueError(f"atss_assign: level_sizes {sizes} must sum to A = {anchors.shape[0]}")
    if topk < 1:
        raise ValueError(f"atss_assign: topk must be >= 1, got {topk}")
    num_anchors, num_gts = anchors.shape[0], gt_boxes.shape[0]
    assigned = torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)
    if num_gts == 0 or num_anchors == 0:
        return assigned
    dtype = torch.promote_types(anchors.dtype, gt_boxes.dtype)
    anchors, gt_boxes = anchors.to(dtype), gt_boxes.to(device=anchors.device, dtype=dtype)
    anchor_centers = (anchors[:, :2] + anchors[:, 2:]) / 2  # [A, 2]
    gt_centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # [G, 2]
    candidates = _nearest_per_level(torch.cdist(anchor_centers, gt_centers), sizes, topk)  # [K, G]
    cand_boxes = anchors[candidates]  # [K, G, 4]
    cand_iou = aligned_iou(cand_boxes.reshape(-1, 4), gt_boxes.repeat(len(candidates), 1))
    cand_iou = cand_iou.reshape(candidates.shape)  # [K, G]
    threshold = cand_iou.mean(dim=0) + cand_iou.std(dim=0)  # [G] (unbiased std)
    centers = anchor_centers[candidates]  # [K, G, 2]
    margin = torch.cat([centers - gt_boxes[:, :2], gt_boxes[:, 2:] - centers], dim=-1)
    is_pos = (cand_iou >= threshold[None]) & (margin.amin(dim=-1) > INSIDE_EPS)
    # Each positive anchor goes to its GT of highest IoU, the lowest index among equals.
    pos_anchor = candidates[is_pos]
    pos_gt = torch.arange(num_gts, device=anchors.device).expand_as(candidates)[is_pos]
    pos_iou = cand_iou[is_pos]
    best = torch.full((num_anchors,), -1.0, dtype=dtype, device=anchors.device)
    best.scatter_reduce_(0, pos_anchor, pos_iou, reduce="amax")
    top = pos_iou == best[pos_anchor]
    owner = torch.full_like(assigned, num_gts)
    owner.scatter_reduce_(0, pos_anchor[top], pos_gt[top], reduce="amin")
    return torch.where(owner < num_gts, owner, assigned)


def _nearest_per_level(distances: Tensor, sizes: Sequence[int], topk: int) -> Tensor:
    """Indices [K, G] of the min(topk, n_l) nearest anchors of every level (K = their sum).

    One top-k per level, each over all GTs at once. (Padding the levels to one tensor for a
    single top-k was measured 4-8x slower on a COCO-sized image: it quadruples the elements.)
    """
    nearest, start = [], 0
    for n in sizes:
        if n:
            rows = distances[start : start + n].t()  # [G, n]
            nearest.append(rows.topk(min(topk, n), dim=1, largest=False).indices.t() + start)
        start += n
    return torch.cat(nearest)


def aligned_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of each pair of rows of xyxy boxes a [N, 4] and b [N, 4] -> [N]."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area_a + area_b - inter).clamp(min=1e-6)


def delta_decode(deltas: Tensor, anchors: Tensor) -> Tensor:
    """[..., A, 4] deltas (dx, dy, dw, dh) / stds from [A, 4] xyxy anchors -> xyxy boxes."""
    stds = deltas.new_tensor(DELTA_STDS)
    d = deltas * stds
    wh = anchors[:, 2:] - anchors[:, :2]
    ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    center = ctr + d[..., :2] * wh
    size = wh * d[..., 2:].clamp(min=-MAX_LOG_RATIO, max=MAX_LOG_RATIO).exp()
    return torch.cat([center - size / 2, center + size / 2], dim=-1)


def anchor_priors(
    feature_sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    device: torch.device | str,
    scale: float,
) -> Priors:
    """One square anchor of `scale` x stride per location, centred at (j * s, i * s) (ATSS and
    GFL: MMDetection's `octave_base_scale` 8, one ratio, `center_offset` 0)."""
    centers, per_anchor = grid_points(feature_sizes, strides, device, half_stride=False)
    sizes = (per_anchor * scale)[:, None].expand(-1, 2).contiguous()
    level_sizes = tuple(int(h) * int(w) for h, w in feature_sizes)
    return Priors(centers, per_anchor, sizes, level_sizes)


def atss_targets(
    priors: Priors, targets: Sequence[dict[str, Tensor]], num_classes: int, topk: int
) -> tuple[Tensor, Tensor]:
    """ATSS assignment of a batch at these anchors: labels [B, A] (num_classes = background)
    and the assigned GT boxes [B, A, 4] xyxy px (zeros for background)."""
    anchors = priors.anchors
    labels, boxes = [], []
    for t in targets:
        gt_boxes, gt_labels = t["boxes"].float(), t["labels"]
        index = atss_assign(anchors, priors.level_sizes, gt_boxes, topk=topk)
        pos = index >= 0
        lab = torch.full_like(index, num_classes)
        lab[pos] = gt_labels[index[pos]].to(lab.dtype)
        box = anchors.new_zeros(anchors.shape)
        box[pos] = gt_boxes[index[pos]]
        labels.append(lab)
        boxes.append(box)
    return torch.stack(labels), torch.stack(boxes)


class ATSSHead(DenseHead):
    """ATSS with an IoU-prediction branch (on the regression tower) instead of a centerness."""

    name = "atss"
    float_predictors = ("cls_logits", "bbox_pred", "iou_pred")
    loss_weights = MappingProxyType({"loss_box": 2.0})  # the ATSS configs' GIoU weight
    # PGD with an ATSS teacher and student (docs/method.md §5, D16): the official K and weights,
    # and the teacher's quality from the score its detections carry (class x IoU prediction)
    pgd_defaults = MappingProxyType(
        {"topk": 9, "alpha": 0.08, "beta": 0.04, "gamma": 0.128, "teacher_score": "detection"}
    )

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
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.anchor_scale = anchor_scale
        self.topk = topk
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.towers = Towers(channels=channels, num_convs=num_convs)
        self.cls_logits = class_predictor(channels, num_classes, prior_prob)
        self.bbox_pred = predictor(channels, 4)
        self.iou_pred = predictor(channels, 1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))

    @classmethod
    def config_kwargs(cls, cfg: Any) -> dict[str, Any]:
        return {
            **super().config_kwargs(cfg),
            "focal_alpha": cfg.focal_alpha,
            "focal_gamma": cfg.focal_gamma,
        }

    def forward(self, feats: list[Tensor]) -> DenseOutputs:
        towers = self.towers(feats)
        return DenseOutputs(
            cls_logits=[self.cls_logits(x) for x in towers.cls_feats],
            box_regression=[
                scale(self.bbox_pred(x)) for scale, x in zip(self.scales, towers.reg_feats)
            ],
            quality=[self.iou_pred(x) for x in towers.reg_feats],
            cls_taps=towers.cls_taps,
            reg_taps=towers.reg_taps,
        )

    def priors(
        self, feature_sizes: Sequence[tuple[int, int]], strides: Sequence[int], device: torch.device
    ) -> Priors:
        return anchor_priors(feature_sizes, strides, device, self.anchor_scale)

    def targets(
        self, priors: Priors, targets: Sequence[dict[str, Tensor]]
    ) -> tuple[Tensor, Tensor]:
        """`atss_targets` of a batch with this head's classes and top-k."""
        return atss_targets(priors, targets, self.num_classes, self.topk)

    def loss(
        self, outputs: DenseOutputs, priors: Priors, targets: Sequence[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """{"loss_cls": focal / #pos, "loss_box": GIoU loss / #pos (unweighted; `loss_weights`
        gives it 2), "loss_iou": BCE of the IoU branch against the positives' IoU / #pos}; the
        positive count is averaged over processes."""
        labels, gt_boxes = self.targets(priors, targets)
        anchors = priors.anchors
        cls = flatten_levels(outputs.cls_logits).float().reshape(-1, self.num_classes)
        deltas = flatten_levels(outputs.box_regression).float().reshape(-1, 4)  # [B*A, 4]
        iou_logits = flatten_levels(outputs.quality).float().reshape(-1)
        labels, gt_boxes = labels.reshape(-1), gt_boxes.reshape(-1, 4)
        pos = torch.nonzero(labels < self.num_classes).squeeze(1)
        num_pos = reduce_mean(torch.tensor(float(pos.numel()), device=cls.device)).clamp(min=1.0)
        onehot = torch.zeros_like(cls)
        onehot[pos, labels[pos]] = 1.0
        loss_cls = (
            sigmoid_focal_loss(
                cls, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
            )
            / num_pos
        )
        if pos.numel() == 0:
            zero = deltas.sum() * 0 + iou_logits.sum() * 0  # graph-connected zero
            return {"loss_cls": loss_cls, "loss_box": zero, "loss_iou": zero}
        pred = delta_decode(deltas[pos], anchors[pos % anchors.shape[0]])
        gt = gt_boxes[pos]
        loss_box = generalized_box_iou_loss(pred, gt, reduction="sum") / num_pos
        with torch.no_grad():
            iou_target = aligned_iou(pred, gt)
        loss_iou = (
            F.binary_cross_entropy_with_logits(iou_logits[pos], iou_target, reduction="sum")
            / num_pos
        )
        return {"loss_cls": loss_cls, "loss_box": loss_box, "loss_iou": loss_iou}

    def decode(self, outputs: DenseOutputs, priors: Priors) -> tuple[Tensor, Tensor]:
        boxes = delta_decode(flatten_levels(outputs.box_regression).float(), priors.anchors)
        cls = flatten_levels(outputs.cls_logits).float().sigmoid()
        iou = flatten_levels(outputs.quality).float().sigmoid()  # [B, A, 1]
        return boxes, cls * iou

    def guidance(self, outputs: DenseOutputs, priors: Priors) -> tuple[Tensor, Tensor]:
        logits = flatten_levels(outputs.cls_logits).float()
        return logits, delta_decode(flatten_levels(outputs.box_regression).float(), priors.anchors)


__all__ = [
    "ATSSHead",
    "aligned_iou",
    "anchor_priors",
    "atss_assign",
    "atss_targets",
    "delta_decode",
]
