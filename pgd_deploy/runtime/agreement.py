"""Label-free detection agreement between two models or runtimes (numpy only).

Used by the export gates (exported artifact vs PyTorch) and by the web demo (teacher vs student):
a reference detection counts as matched when the other side has a detection of the same class with
IoU >= a threshold, each detection matched at most once (greedy, by decreasing score).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pgd_deploy.runtime.postprocess import box_iou
from pgd_deploy.structures import Detections


@dataclass
class Matching:
    """Result of matching one image's detections.

    Attributes:
        matched_ref: bool [N_ref] for the reference detections above the threshold.
        matched_other: bool [N_other] for the other side's detections above the threshold.
    """

    matched_ref: np.ndarray
    matched_other: np.ndarray


def match_detections(
    reference: Detections, other: Detections, *, iou_thresh: float = 0.9, score_thresh: float = 0.05
) -> Matching:
    """Greedily match `reference` to `other` (same class, IoU >= iou_thresh), both thresholded."""
    ref = reference.filter(score_thresh)
    oth = other.filter(score_thresh)
    matched_ref = np.zeros(len(ref), dtype=bool)
    matched_other = np.zeros(len(oth), dtype=bool)
    if len(ref) and len(oth):
        iou = box_iou(ref.boxes, oth.boxes)  # [N_ref, N_other]
        iou[ref.labels[:, None] != oth.labels[None, :]] = -1.0
        for i in np.argsort(-ref.scores, kind="stable"):
            cand = np.where(matched_other, -1.0, iou[i])
            j = int(cand.argmax())
            if cand[j] >= iou_thresh:
                matched_ref[i] = True
                matched_other[j] = True
    return Matching(matched_ref, matched_other)


def detection_agreement(
    reference: Sequence[Detections],
    other: Sequence[Detections],
    *,
    iou_thresh: float = 0.9,
    score_thresh: float = 0.05,
) -> float:
    """Fraction of reference detections (over all images) matched by `other`; 1.0 if none."""
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference images but {len(other)} to compare")
    total = matched = 0
    for ref, oth in zip(reference, other, strict=True):
        m = match_detections(ref, oth, iou_thresh=iou_thresh, score_thresh=score_thresh)
        total += m.matched_ref.size
        matched += int(m.matched_ref.sum())
    return 1.0 if total == 0 else matched / total
