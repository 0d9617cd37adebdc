"""Detection agreement (runtime/agreement.py): each detection matched at most once."""

from __future__ import annotations

import numpy as np

from pgd_deploy.runtime.agreement import detection_agreement, match_detections
from pgd_deploy.structures import Detections


def test_matching_is_one_to_one():
    """Two reference detections of one class, both at IoU >= the threshold with the single
    exported one: one is reproduced, not both (agreement 0.5, not 1.0)."""
    reference = Detections(
        np.array([[10, 10, 50, 50], [11, 11, 51, 51]], np.float32), [0.9, 0.8], [2, 2]
    )
    exported = Detections(np.array([[10, 10, 50, 50]], np.float32), [0.9], [2])
    m = match_detections(reference, exported, iou_thresh=0.9)
    assert m.matched_ref.tolist() == [True, False] and m.matched_other.tolist() == [True]
    assert detection_agreement([reference], [exported], iou_thresh=0.9) == 0.5
    assert detection_agreement([exported], [reference], iou_thresh=0.9) == 1.0
