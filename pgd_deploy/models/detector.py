"""Dense one-stage detector: a ResNet-FPN backbone and any dense head (`models.heads`).

The detector's forward returns the head's raw outputs, tap features included (`DenseOutputs`).
Its priors, losses, decoding, PGD guidance and post-processing are separate methods, each the
head's protocol member applied to these outputs' feature maps, so that the training engine, the
distiller and the export wrapper each call exactly what they need and never which head it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from pgd_deploy.models.backbone import ResNetFPN
from pgd_deploy.models.heads import (
    DenseHead,
    DenseOutputs,
    Priors,
    flatten_levels,
    joint_logits,
)
from pgd_deploy.runtime.defaults import MAX_DETECTIONS, NMS_THRESH, SCORE_THRESH, TOPK_CANDIDATES
from pgd_deploy.runtime.postprocess import postprocess_batch
from pgd_deploy.runtime.preprocess import ImageTransform
from pgd_deploy.structures import Detections


class DenseDetector(nn.Module):
    """ResNet-FPN + a dense head.

    Forward: images float32 [B, 3, H, W] (normalised, padded to a multiple of 32) ->
    `DenseOutputs`.
    """

    def __init__(
        self,
        *,
        backbone: ResNetFPN,
        head: DenseHead,
        num_classes: int,
        score_thresh: float = SCORE_THRESH,
        nms_thresh: float = NMS_THRESH,
        score_before_quality: bool = False,
        topk_candidates: int = TOPK_CANDIDATES,
        max_detections: int = MAX_DETECTIONS,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_classes = num_classes
        self.strides = backbone.strides
        self.score_before_quality = score_before_quality
        self.postprocess_kwargs = {
            "score_thresh": score_thresh,
            "nms_thresh": nms_thresh,
            "topk_candidates": topk_candidates,
            "max_det": max_detections,
        }

    def forward(self, images: Tensor) -> DenseOutputs:
        return self.head(self.backbone(images))

    # ---- geometry -----------------------------------------------------------------------

    @staticmethod
    def feature_sizes(outputs: DenseOutputs) -> list[tuple[int, int]]:
        return [(int(t.shape[-2]), int(t.shape[-1])) for t in outputs.cls_logits]

    def priors(self, outputs: DenseOutputs) -> Priors:
        """The head's location priors for these outputs' feature maps."""
        device = outputs.cls_logits[0].device
        return self.head.priors(self.feature_sizes(outputs), self.strides, device)

    def points(self, outputs: DenseOutputs) -> tuple[Tensor, Tensor]:
        """Location centres [A, 2] (x, y) px and strides [A] (points or anchor centres)."""
        priors = self.priors(outputs)
        return priors.centers, priors.strides

    def level_sizes(self, outputs: DenseOutputs) -> list[int]:
        return [h * w for h, w in self.feature_sizes(outputs)]

    # ---- training -----------------------------------------------------------------------

    def loss(
        self, outputs: DenseOutputs, targets: Sequence[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Detection losses. `targets[i]`: {"boxes": [G, 4] xyxy input px, "labels": [G]}."""
        return self.head.loss(outputs, self.priors(outputs), targets)

    def guidance(
        self,
        outputs: DenseOutputs,
        *,
        with_quality: bool = False,
        index_stride_group: int | None = None,
    ) -> tuple[Tensor, Tensor, Priors]:
        """PGD's teacher prediction: class logits [B, A, C], decoded boxes [B, A, 4] px and the
        priors they belong to.

        `with_quality`: the logits of the class score times the head's quality branch (FCOS
        centerness, ATSS IoU; `heads.joint_logits`), the score its detections carry. A head
        without a separate branch (GFL's logits are already its joint score) is unchanged.
        `index_stride_group`: reproduce the official GFL code's bug (docs/method.md D4): the
        boxes of the i-th image of each group of this many are decoded with the stride of level
        i on every level (a head whose decoding reads no stride, like ATSS's, is unchanged).
        """
        priors = self.priors(outputs)
        logits, boxes = self.head.guidance(outputs, priors)
        if with_quality and outputs.quality is not None:
            logits = joint_logits(logits, flatten_levels(outputs.quality).float())
        if index_stride_group is not None:
            per_image = []
            for b in range(boxes.shape[0]):
                stride = self.strides[(b % index_stride_group) % len(self.strides)]
                wrong = dataclasses.replace(priors, strides=torch.full_like(priors.strides, stride))
                per_image.append(self.head.guidance(_image(outputs, b), wrong)[1])
            boxes = torch.cat(per_image)
        return logits, boxes, priors

    # ---- inference ----------------------------------------------------------------------

    def decode(self, outputs: DenseOutputs) -> tuple[Tensor, Tensor]:
        """The export contract: boxes [B, A, 4] xyxy px and per-class scores [B, A, C] (fp32)."""
        return self.head.decode(outputs, self.priors(outputs))

    def decode_boxes(self, outputs: DenseOutputs) -> Tensor:
        """Every location's box, absolute xyxy pixels of the network input [B, A, 4] (fp32)."""
        return self.decode(outputs)[0]

    @torch.no_grad()
    def predict(
        self, images: Tensor, transforms: Sequence[ImageTransform | None], **overrides: float
    ) -> list[Detections]:
        """Detections in original-image pixels, through the shared numpy post-processing.

        With a quality branch the scores are sigmoid(cls) x sigmoid(quality). With
        `score_before_quality` (MMDetection's order, `model.score_before_centerness`) a
        (location, class) is a candidate when sigmoid(cls) alone exceeds `score_thresh`, and is
        then scored by the product; otherwise the product must exceed it (the exported models'
        rule).
        """
        outputs = self(images)
        boxes, scores = self.decode(outputs)
        kwargs = {**self.postprocess_kwargs, **overrides}
        if self.score_before_quality and outputs.quality is not None:
            cls = flatten_levels(outputs.cls_logits).float().sigmoid()  # [B, A, C]
            scores = torch.where(cls > kwargs["score_thresh"], scores, torch.zeros_like(scores))
            kwargs["score_thresh"] = 0.0  # the candidates are the nonzero scores now
        return postprocess_batch(
            boxes.cpu().numpy().astype(np.float32),
            scores.cpu().numpy().astype(np.float32),
            transforms,
            level_sizes=self.level_sizes(outputs),
            **kwargs,
        )


def _image(outputs: DenseOutputs, index: int) -> DenseOutputs:
    """The outputs of one image of the batch (a batch of one)."""
    return DenseOutputs(
        *(None if field is None else [t[index : index + 1] for t in field] for field in outputs)
    )
