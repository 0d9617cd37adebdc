"""FCOS head as in the PGD configs (MMDetection "FCOS improved").

Focal loss (gamma 2, alpha 0.25), box loss weighted by centerness targets, centerness on the
regression branch with BCE, centre sampling radius 1.5, regression normalised by the stride
(norm_on_bbox), points at i * s + s // 2. The box loss is 1 - GIoU by default (`model.box_loss`);
the official PGD FCOS head uses MMDetection's IoULoss, -log IoU (`box_loss="iou"`).

The head always predicts distances in stride units (ReLU'd); `decode_boxes` multiplies by the
stride in train and eval mode alike, so decoded teacher boxes are always in pixels (the official
code's eval-only multiplication is docs/method.md D7).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from pgd_deploy.distributed import reduce_mean
from pgd_deploy.models.heads import DenseHead, DenseOutputs, Priors, flatten_levels, grid_points
from pgd_deploy.models.towers import Scale, Towers, class_predictor, predictor

INF = 1e8


class FCOSHead(DenseHead):
    """FCOS predictors on top of the shared towers: one point per location, distances (l, t, r,
    b) / stride, a centerness branch (the `quality` of its outputs) on the regression tower."""

    name = "fcos"
    float_predictors = ("cls_logits", "bbox_pred", "centerness")

    def __init__(
        self,
        *,
        num_classes: int,
        channels: int = 256,
        num_convs: int = 4,
        num_levels: int = 5,
        prior_prob: float = 0.01,
        center_sampling_radius: float = 1.5,
        regress_ranges: Sequence[float] = (64.0, 128.0, 256.0, 512.0),
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_loss: str = "giou",
    ) -> None:
        super().__init__()
        _check_options(regress_ranges, box_loss, num_levels)
        self.num_classes = num_classes
        self.center_sampling_radius = center_sampling_radius
        self.ranges = _ranges(tuple(regress_ranges))
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.box_loss = box_loss
        self.towers = Towers(channels=channels, num_convs=num_convs)
        self.cls_logits = class_predictor(channels, num_classes, prior_prob)
        self.bbox_pred = predictor(channels, 4)
        self.centerness = predictor(channels, 1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))

    @classmethod
    def config_kwargs(cls, cfg: Any) -> dict[str, Any]:
        _check_options(cfg.regress_ranges, cfg.box_loss)  # before the backbone is built
        return {
            **super().config_kwargs(cfg),
            "center_sampling_radius": cfg.center_sampling_radius,
            "regress_ranges": cfg.regress_ranges,
            "focal_alpha": cfg.focal_alpha,
            "focal_gamma": cfg.focal_gamma,
            "box_loss": cfg.box_loss,
        }

    def forward(self, feats: list[Tensor]) -> DenseOutputs:
        towers = self.towers(feats)
        box_regression = [
            F.relu(scale(self.bbox_pred(x))) for scale, x in zip(self.scales, towers.reg_feats)
        ]
        return DenseOutputs(
            cls_logits=[self.cls_logits(x) for x in towers.cls_feats],
            box_regression=box_regression,
            quality=[self.centerness(x) for x in towers.reg_feats],
            cls_taps=towers.cls_taps,
            reg_taps=towers.reg_taps,
        )

    def priors(
        self, feature_sizes: Sequence[tuple[int, int]], strides: Sequence[int], device: torch.device
    ) -> Priors:
        sizes = list(feature_sizes)
        centers, per_point = level_points(sizes, tuple(strides), device, torch.float32)
        return Priors(centers, per_point, None, tuple(int(h) * int(w) for h, w in sizes))

    def targets(
        self, priors: Priors, targets: Sequence[dict[str, Tensor]]
    ) -> tuple[Tensor, Tensor]:
        """FCOS assignment of a batch: labels [B, A] (num_classes = background) and box targets
        [B, A, 4] (l, t, r, b) / stride."""
        ranges = torch.cat(
            [
                priors.centers.new_tensor(rng).expand(n, 2)
                for rng, n in zip(self.ranges, priors.level_sizes, strict=True)
            ]
        )
        labels, boxes = [], []
        for t in targets:
            lab, box = fcos_targets_single(
                priors.centers,
                priors.strides,
                ranges,
                t["boxes"].float(),
                t["labels"],
                num_classes=self.num_classes,
                radius=self.center_sampling_radius,
            )
            labels.append(lab)
            boxes.append(box)
        return torch.stack(labels), torch.stack(boxes)

    def loss(
        self, outputs: DenseOutputs, priors: Priors, targets: Sequence[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        labels, box_targets = self.targets(priors, targets)
        return fcos_losses(
            outputs,
            labels,
            box_targets,
            num_classes=self.num_classes,
            focal_alpha=self.focal_alpha,
            focal_gamma=self.focal_gamma,
            box_loss=self.box_loss,
        )

    def decode(self, outputs: DenseOutputs, priors: Priors) -> tuple[Tensor, Tensor]:
        boxes = decode_boxes(outputs.box_regression, priors.centers, priors.strides)
        return boxes, class_scores(outputs)

    def guidance(self, outputs: DenseOutputs, priors: Priors) -> tuple[Tensor, Tensor]:
        logits = flatten_levels(outputs.cls_logits).float()
        return logits, decode_boxes(outputs.box_regression, priors.centers, priors.strides)


def _check_options(regress_ranges: Sequence[float], box_loss: str, num_levels: int = 5) -> None:
    if len(regress_ranges) != num_levels - 1:
        raise ValueError(
            f"model.regress_ranges needs {num_levels - 1} boundaries, got {tuple(regress_ranges)}"
        )
    if box_loss not in BOX_LOSSES:
        raise ValueError(f"model.box_loss must be 'giou' or 'iou', got {box_loss!r}")


# --------------------------------------------------------------------------------------------
# Points, decoding
# --------------------------------------------------------------------------------------------


def level_points(
    sizes: list[tuple[int, int]], strides: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """FCOS's location centres of all levels, P3 first: (j * s + s // 2, i * s + s // 2) pixels
    [A, 2], and strides [A] (`heads.grid_points` with the half-stride offset)."""
    return grid_points(sizes, strides, device, half_stride=True, dtype=dtype)


def decode_boxes(box_regression: list[Tensor], centers: Tensor, strides: Tensor) -> Tensor:
    """Absolute xyxy boxes [B, A, 4] from stride-normalised distances (computed in fp32)."""
    dist = flatten_levels(box_regression).float() * strides[None, :, None].float()  # [B, A, 4]
    c = centers[None].float()  # [1, A, 2]
    return torch.cat([c - dist[..., :2], c + dist[..., 2:]], dim=-1)


def class_scores(outputs: DenseOutputs) -> Tensor:
    """Per-class detection scores [B, A, C] = sigmoid(cls) * sigmoid(centerness)."""
    cls = flatten_levels(outputs.cls_logits).float().sigmoid()
    ctr = flatten_levels(outputs.quality).float().sigmoid()  # [B, A, 1]
    return cls * ctr


# --------------------------------------------------------------------------------------------
# Targets and losses
# --------------------------------------------------------------------------------------------


def regress_ranges(boundaries: tuple[float, ...]) -> list[tuple[float, float]]:
    """(64, 128, 256, 512) -> [(-1, 64), (64, 128), (128, 256), (256, 512), (512, INF)]."""
    edges = [-1.0, *boundaries, INF]
    return list(zip(edges[:-1], edges[1:]))


def fcos_targets_single(
    centers: Tensor,
    strides: Tensor,
    ranges: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    *,
    num_classes: int,
    radius: float,
) -> tuple[Tensor, Tensor]:
    """FCOS assignment for one image.

    Args:
        centers: [A, 2] location centres; strides: [A]; ranges: [A, 2] regress range per location.
        gt_boxes: [G, 4] xyxy pixels; gt_labels: [G] class indices.

    Returns:
        labels [A] (num_classes = background) and box targets [A, 4] (l, t, r, b) / stride.
    """
    num_points = centers.shape[0]
    if gt_boxes.numel() == 0:
        return (
            centers.new_full((num_points,), num_classes, dtype=torch.long),
            centers.new_zeros((num_points, 4)),
        )
    xs, ys = centers[:, 0:1], centers[:, 1:2]  # [A, 1]
    x1, y1, x2, y2 = gt_boxes.unbind(dim=1)  # [G] each
    ltrb = torch.stack([xs - x1, ys - y1, x2 - xs, y2 - ys], dim=-1)  # [A, G, 4]
    # Centre sampling: a location is positive only within radius * stride of the box centre.
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    r = strides[:, None] * radius  # [A, 1]
    cx1, cy1 = torch.maximum(cx - r, x1), torch.maximum(cy - r, y1)
    cx2, cy2 = torch.minimum(cx + r, x2), torch.minimum(cy + r, y2)
    in_center = torch.stack([xs - cx1, ys - cy1, cx2 - xs, cy2 - ys], dim=-1).min(dim=-1).values > 0
    max_dist = ltrb.max(dim=-1).values  # [A, G]
    in_range = (max_dist >= ranges[:, 0:1]) & (max_dist <= ranges[:, 1:2])
    areas = ((x2 - x1) * (y2 - y1))[None].expand(num_points, -1).clone()  # [A, G]
    areas[~(in_center & in_range)] = INF
    min_area, gt_index = areas.min(dim=1)  # [A]
    labels = gt_labels[gt_index].clone()
    labels[min_area == INF] = num_classes
    targets = ltrb[torch.arange(num_points, device=centers.device), gt_index]  # [A, 4]
    return labels, targets / strides[:, None]


def centerness_target(ltrb: Tensor) -> Tensor:
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) for [P, 4] targets."""
    lr, tb = ltrb[:, [0, 2]], ltrb[:, [1, 3]]
    ratio = (lr.min(dim=-1).values / lr.max(dim=-1).values.clamp(min=1e-12)) * (
        tb.min(dim=-1).values / tb.max(dim=-1).values.clamp(min=1e-12)
    )
    return ratio.clamp(min=0).sqrt()


IOU_LOSS_EPS = 1e-6  # MMDetection IoULoss: union clamp and IoU floor before the log


def iou_loss_ltrb(pred: Tensor, target: Tensor, eps: float = IOU_LOSS_EPS) -> Tensor:
    """IoU loss -log(IoU) [P] (MMDetection's IoULoss, mode "log"), distances from the same points.

    The union is clamped at `eps` and the IoU floored at `eps` before the log, as there.
    """
    pred_area = (pred[:, 0] + pred[:, 2]) * (pred[:, 1] + pred[:, 3])
    target_area = (target[:, 0] + target[:, 2]) * (target[:, 1] + target[:, 3])
    w_inter = torch.minimum(pred[:, 0], target[:, 0]) + torch.minimum(pred[:, 2], target[:, 2])
    h_inter = torch.minimum(pred[:, 1], target[:, 1]) + torch.minimum(pred[:, 3], target[:, 3])
    inter = w_inter.clamp(min=0) * h_inter.clamp(min=0)
    iou = inter / (pred_area + target_area - inter).clamp(min=eps)
    return -iou.clamp(min=eps).log()


def giou_loss_ltrb(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """GIoU loss [P] between boxes given as distances (l, t, r, b) from the same points."""
    pred_area = (pred[:, 0] + pred[:, 2]) * (pred[:, 1] + pred[:, 3])
    target_area = (target[:, 0] + target[:, 2]) * (target[:, 1] + target[:, 3])
    w_inter = torch.minimum(pred[:, 0], target[:, 0]) + torch.minimum(pred[:, 2], target[:, 2])
    h_inter = torch.minimum(pred[:, 1], target[:, 1]) + torch.minimum(pred[:, 3], target[:, 3])
    inter = w_inter.clamp(min=0) * h_inter.clamp(min=0)
    union = pred_area + target_area - inter
    iou = inter / union.clamp(min=eps)
    w_encl = torch.maximum(pred[:, 0], target[:, 0]) + torch.maximum(pred[:, 2], target[:, 2])
    h_encl = torch.maximum(pred[:, 1], target[:, 1]) + torch.maximum(pred[:, 3], target[:, 3])
    enclose = (w_encl * h_encl).clamp(min=eps)
    return 1 - (iou - (enclose - union) / enclose)


BOX_LOSSES = {"giou": giou_loss_ltrb, "iou": iou_loss_ltrb}  # `model.box_loss`
_ranges = regress_ranges  # FCOSHead.__init__ has an argument of that name


def fcos_losses(
    outputs: DenseOutputs,
    labels: Tensor,
    box_targets: Tensor,
    *,
    num_classes: int,
    focal_alpha: float,
    focal_gamma: float,
    box_loss: str = "giou",
) -> dict[str, Tensor]:
    """FCOS losses given assigned targets.

    Args:
        outputs: head outputs of the batch.
        labels: [B, A] class index per location (num_classes = background).
        box_targets: [B, A, 4] (l, t, r, b) / stride.
        box_loss: "giou" (1 - GIoU) or "iou" (-log IoU, the official head's).

    Returns:
        {"loss_cls", "loss_box", "loss_ctr"}: focal loss / #pos, centerness-weighted box loss /
        sum of centerness targets, centerness BCE / #pos (counts averaged over processes).
    """
    cls = flatten_levels(outputs.cls_logits).float().reshape(-1, num_classes)  # [B*A, C]
    reg = flatten_levels(outputs.box_regression).float().reshape(-1, 4)  # [B*A, 4]
    ctr = flatten_levels(outputs.quality).float().reshape(-1)  # [B*A] centerness
    labels = labels.reshape(-1)
    box_targets = box_targets.reshape(-1, 4)
    pos = torch.nonzero(labels < num_classes).squeeze(1)
    num_pos = reduce_mean(torch.tensor(float(pos.numel()), device=cls.device)).clamp(min=1.0)
    onehot = torch.zeros_like(cls)
    onehot[pos, labels[pos]] = 1.0
    loss_cls = (
        sigmoid_focal_loss(cls, onehot, alpha=focal_alpha, gamma=focal_gamma, reduction="sum")
        / num_pos
    )
    if pos.numel() == 0:
        zero = reg.sum() * 0 + ctr.sum() * 0  # graph-connected zero
        return {"loss_cls": loss_cls, "loss_box": zero, "loss_ctr": zero}
    pos_targets = box_targets[pos]
    ctr_targets = centerness_target(pos_targets)
    ctr_denorm = reduce_mean(ctr_targets.sum().detach()).clamp(min=1e-6)
    per_box = BOX_LOSSES[box_loss](reg[pos], pos_targets)  # [P]
    loss_box = (per_box * ctr_targets).sum() / ctr_denorm
    loss_ctr = F.binary_cross_entropy_with_logits(ctr[pos], ctr_targets, reduction="sum") / num_pos
    return {"loss_cls": loss_cls, "loss_box": loss_box, "loss_ctr": loss_ctr}
