"""Detection agreement (runtime/agreement.py): each detection matched at most once."""

from __future__ import annotations

import numpy as np
import pytest

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


def _dets(boxes, scores, labels):
    return Detections(
        np.asarray(boxes, np.float32), np.asarray(scores, np.float32), np.asarray(labels, np.int64)
    )


def test_a_box_at_exactly_the_iou_threshold_matches_and_a_bit_below_does_not():
    ref = _dets([[0, 0, 10, 10]], [0.9], [0])
    half = _dets([[0, 0, 20, 10]], [0.9], [0])  # IoU 100 / 200 = 0.5 exactly
    assert detection_agreement([ref], [half], iou_thresh=0.5) == 1.0
    assert detection_agreement([ref], [half], iou_thresh=0.5001) == 0.0
    assert match_detections(ref, _dets([[0, 0, 10, 10]], [0.9], [0])).matched_ref.tolist() == [True]
    # the default threshold is 0.9: a 10 % larger box (IoU 0.909) matches, a 20 % one does not
    assert detection_agreement([ref], [_dets([[0, 0, 11, 10]], [0.9], [0])]) == 1.0
    assert detection_agreement([ref], [_dets([[0, 0, 12, 10]], [0.9], [0])]) == 0.0


def test_no_reference_detection_is_full_agreement_and_image_counts_must_match():
    empty = _dets(np.zeros((0, 4)), [], [])
    assert detection_agreement([empty], [_dets([[0, 0, 5, 5]], [0.9], [0])]) == 1.0
    low = _dets([[0, 0, 5, 5]], [0.01], [0])  # under the 0.05 score threshold: not counted
    assert detection_agreement([low], [empty]) == 1.0
    assert detection_agreement([low], [empty], score_thresh=0.0) == 0.0
    with pytest.raises(ValueError, match="^2 reference images but 1 to compare$"):
        detection_agreement([low, low], [low])
    matching = match_detections(low, low, score_thresh=0.0)
    assert matching.matched_ref.dtype == bool and matching.matched_other.dtype == bool
