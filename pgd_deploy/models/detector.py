"""Dense one-stage detector: ResNet-FPN backbone + a dense head (FCOS).

The detector's forward returns the raw head outputs, tap features included (see `HeadOutputs`).
Losses, decoding and post-processing are separate methods so that the training engine, the
distiller and the export wrapper each call exactly what they need.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from pgd_deploy.models import fcos
from pgd_deploy.models.backbone import ResNetFPN
from pgd_deploy.models.fcos import HeadOutputs
from pgd_deploy.runtime.postprocess import postprocess_batch
from pgd_deploy.runtime.preprocess import ImageTransform
from pgd_deploy.structures import Detections


class DenseDetector(nn.Module):
    """ResNet-FPN + FCOS head.

    Forward: images float32 [B, 3, H, W] (normalised, padded to a multiple of 32) -> HeadOutputs.
    """

    def __init__(
        self,
        *,
        backbone: ResNetFPN,
        head: fcos.FCOSHead,
        num_classes: int,
        center_sampling_radius: float = 1.5,
        regress_ranges: tuple[float, ...] = (64.0, 128.0, 256.0, 512.0),
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_loss: str = "giou",
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        score_before_centerness: bool = False,
        topk_candidates: int = 1000,
        max_detections: int = 100,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_classes = num_classes
        self.strides = backbone.strides
        self.center_sampling_radius = center_sampling_radius
        self.ranges = fcos.regress_ranges(regress_ranges)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        if box_loss not in fcos.BOX_LOSSES:
            raise ValueError(f"model.box_loss must be 'giou' or 'iou', got {box_loss!r}")
        self.box_loss = box_loss
        self.score_before_centerness = score_before_centerness
        self.postprocess_kwargs = {
            "score_thresh": score_thresh,
            "nms_thresh": nms_thresh,
            "topk_candidates": topk_candidates,
            "max_det": max_detections,
        }

    def forward(self, images: Tensor) -> HeadOutputs:
        return self.head(self.backbone(images))

    # ---- geometry -----------------------------------------------------------------------

    @staticmethod
    def feature_sizes(outputs: HeadOutputs) -> list[tuple[int, int]]:
        return [(int(t.shape[-2]), int(t.shape[-1])) for t in outputs.cls_logits]

    def points(self, outputs: HeadOutputs) -> tuple[Tensor, Tensor]:
        """Location centres [A, 2] (x, y) px and strides [A] for these outputs' feature maps."""
        ref = outputs.cls_logits[0]
        return fcos.level_points(
            self.feature_sizes(outputs), self.strides, ref.device, torch.float32
        )

    def level_sizes(self, outputs: HeadOutputs) -> list[int]:
        return [h * w for h, w in self.feature_sizes(outputs)]

    # ---- training -----------------------------------------------------------------------

    def targets(
        self, outputs: HeadOutputs, targets: Sequence[dict[str, Tensor]]
    ) -> tuple[Tensor, Tensor]:
        """FCOS labels [B, A] and box targets [B, A, 4] for a batch."""
        centers, strides = self.points(outputs)
        ranges = torch.cat(
            [
                centers.new_tensor(rng).expand(h * w, 2)
                for rng, (h, w) in zip(self.ranges, self.feature_sizes(outputs))
            ]
        )
        labels, boxes = [], []
        for t in targets:
            lab, box = fcos.fcos_targets_single(
                centers,
                strides,
                ranges,
                t["boxes"].float(),
                t["labels"],
                num_classes=self.num_classes,
                radius=self.center_sampling_radius,
            )
            labels.append(lab)
            boxes.append(box)
        return torch.stack(labels), torch.stack(boxes)

    def loss(self, outputs: HeadOutputs, targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Detection losses. `targets[i]`: {"boxes": [G, 4] xyxy input px, "labels": [G]}."""
        labels, box_targets = self.targets(outputs, targets)
        return fcos.fcos_losses(
            outputs,
            labels,
            box_targets,
            num_classes=self.num_classes,
            focal_alpha=self.focal_alpha,
            focal_gamma=self.focal_gamma,
            box_loss=self.box_loss,
        )

    # ---- inference ----------------------------------------------------------------------

    def decode_boxes(self, outputs: HeadOutputs) -> Tensor:
        """Every location's box, absolute xyxy pixels of the network input [B, A, 4] (fp32)."""
        centers, strides = self.points(outputs)
        return fcos.decode_boxes(outputs.box_regression, centers, strides)

    def decode(self, outputs: HeadOutputs) -> tuple[Tensor, Tensor]:
        """The export contract: boxes [B, A, 4] xyxy px and per-class scores [B, A, C] (fp32)."""
        return self.decode_boxes(outputs), fcos.class_scores(outputs)

    @torch.no_grad()
    def predict(
        self, images: Tensor, transforms: Sequence[ImageTransform | None], **overrides: float
    ) -> list[Detections]:
        """Detections in original-image pixels, through the shared numpy post-processing.

        The scores are sigmoid(cls) x sigmoid(centerness). With `score_before_centerness`
        (MMDetection's order, `model.score_before_centerness`) a (location, class) is a
        candidate when sigmoid(cls) alone exceeds `score_thresh`, and is then scored by the
        product; otherwise the product must exceed it (the exported models' rule).
        """
        outputs = self(images)
        boxes, scores = self.decode(outputs)
        kwargs = {**self.postprocess_kwargs, **overrides}
        if self.score_before_centerness:
            cls = fcos.flatten_levels(outputs.cls_logits).float().sigmoid()  # [B, A, C]
            scores = torch.where(cls > kwargs["score_thresh"], scores, torch.zeros_like(scores))
            kwargs["score_thresh"] = 0.0  # the candidates are the nonzero scores now
        return postprocess_batch(
            boxes.cpu().numpy().astype(np.float32),
            scores.cpu().numpy().astype(np.float32),
            transforms,
            level_sizes=self.level_sizes(outputs),
            **kwargs,
        )
