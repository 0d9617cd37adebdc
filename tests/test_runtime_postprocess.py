"""Tests of pgd_deploy.runtime.postprocess: NMS against a brute-force reference, class-aware
suppression, per-level top-k, thresholds, max detections and un-letterboxing."""

from __future__ import annotations

import numpy as np
import pytest

from pgd_deploy.runtime.postprocess import (
    batched_nms,
    box_iou,
    nms,
    postprocess,
    postprocess_batch,
    select_candidates,
)
from pgd_deploy.runtime.preprocess import ImageTransform


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _reference_nms(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> list[int]:
    """Textbook greedy NMS: visit by decreasing score, keep unless it overlaps a kept box."""
    keep: list[int] = []
    for i in sorted(range(len(scores)), key=lambda k: (-scores[k], k)):
        if all(_iou(boxes[i], boxes[j]) <= thresh for j in keep):
            keep.append(i)
    return keep


def _random_boxes(rng: np.random.Generator, n: int, extent: float = 100.0) -> np.ndarray:
    xy = rng.uniform(0, extent, size=(n, 2))
    wh = rng.uniform(5, 40, size=(n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def test_box_iou_matches_pairwise_reference() -> None:
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 7), _random_boxes(rng, 5)
    expected = [[_iou(x, y) for y in b] for x in a]
    np.testing.assert_allclose(box_iou(a, b), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("thresh", [0.3, 0.5, 0.7])
def test_nms_equals_brute_force(seed: int, thresh: float) -> None:
    rng = np.random.default_rng(seed)
    boxes = _random_boxes(rng, 80, extent=60.0)  # crowded: plenty of suppression
    scores = rng.uniform(0, 1, size=80).astype(np.float32)
    keep = nms(boxes, scores, thresh)
    assert keep.tolist() == _reference_nms(boxes, scores, thresh)


def test_nms_edge_cases() -> None:
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).tolist() == []
    box = np.array([[0, 0, 10, 10]], np.float32)
    assert nms(box, np.array([0.3], np.float32), 0.5).tolist() == [0]
    same = np.repeat(box, 3, axis=0)
    assert nms(same, np.array([0.1, 0.9, 0.5], np.float32), 0.5).tolist() == [1]


def test_batched_nms_is_class_aware() -> None:
    rng = np.random.default_rng(3)
    boxes = _random_boxes(rng, 60, extent=50.0)
    scores = rng.uniform(0, 1, size=60).astype(np.float32)
    labels = rng.integers(0, 3, size=60)
    keep = batched_nms(boxes, scores, labels, 0.5)
    expected = []
    for c in range(3):
        idx = np.flatnonzero(labels == c)
        expected += [int(idx[k]) for k in _reference_nms(boxes[idx], scores[idx], 0.5)]
    assert sorted(keep.tolist()) == sorted(expected)
    assert np.all(np.diff(scores[keep]) <= 0)  # decreasing score order
    # Two identical boxes of different classes both survive; of one class only one does.
    two = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    s = np.array([0.9, 0.8], np.float32)
    assert sorted(batched_nms(two, s, np.array([0, 1]), 0.5).tolist()) == [0, 1]
    assert batched_nms(two, s, np.array([2, 2]), 0.5).tolist() == [0]


def test_select_candidates_threshold_and_per_level_topk() -> None:
    # Two levels of 4 and 2 locations, 2 classes; scores chosen so the top-k differ per level.
    scores = np.array(
        [[0.9, 0.1], [0.8, 0.7], [0.6, 0.02], [0.5, 0.4], [0.3, 0.2], [0.01, 0.25]], np.float32
    )
    loc, lab, val = select_candidates(scores, 0.05, topk=2, level_sizes=[4, 2])
    got = sorted(zip(loc.tolist(), lab.tolist(), [round(float(v), 3) for v in val]))
    # level 0: top-2 of {0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.1}; level 1: top-2 of {0.3, 0.25, 0.2}
    assert got == [(0, 0, 0.9), (1, 0, 0.8), (4, 0, 0.3), (5, 1, 0.25)]
    loc, lab, val = select_candidates(scores, 0.45, topk=100)
    assert sorted(round(float(v), 2) for v in val) == [0.5, 0.6, 0.7, 0.8, 0.9]
    with pytest.raises(ValueError, match="level_sizes sum to 5, but scores has 6 rows"):
        select_candidates(scores, 0.05, topk=2, level_sizes=[4, 1])


def test_postprocess_thresholds_sorts_caps_and_unletterboxes() -> None:
    boxes = np.array(
        [[10, 10, 30, 30], [11, 11, 31, 31], [50, 50, 60, 60], [0, 0, 5, 5], [70, 10, 90, 20]],
        np.float32,
    )
    scores = np.zeros((5, 2), np.float32)
    scores[:, 0] = [0.9, 0.8, 0.0, 0.01, 0.0]
    scores[:, 1] = [0.0, 0.0, 0.7, 0.0, 0.6]
    # The image was 200x100 (w x h), letterboxed at scale 0.5 into a 64x128 input.
    tf = ImageTransform(0.5, 0.5, 100, 200, 50, 100)
    dets = postprocess(boxes, scores, tf, score_thresh=0.05, nms_thresh=0.5, max_det=10)
    assert dets.scores.tolist() == pytest.approx([0.9, 0.6])
    assert dets.labels.tolist() == [0, 1]
    # box 2 is clipped to the letterboxed content (50 px high) before scaling back: zero height,
    # dropped after NMS and the max_det cut, as the in-graph NMS outputs are (drop_degenerate)
    np.testing.assert_allclose(dets.boxes, [[20, 20, 60, 60], [140, 20, 180, 40]])
    capped = postprocess(boxes, scores, tf, score_thresh=0.05, nms_thresh=0.5, max_det=2)
    assert capped.scores.tolist() == pytest.approx([0.9])  # the cut took the 0.7, then dropped
    loose = postprocess(boxes, scores, None, score_thresh=0.05, nms_thresh=0.99)
    assert len(loose) == 4  # nothing suppressed; boxes stay in network pixels
    np.testing.assert_allclose(loose.boxes[1], [11, 11, 31, 31])


def test_postprocess_empty_and_shape_errors() -> None:
    dets = postprocess(np.zeros((3, 4), np.float32), np.zeros((3, 2), np.float32))
    assert len(dets) == 0 and dets.boxes.shape == (0, 4)
    with pytest.raises(ValueError, match=r"expected boxes \[N, 4\] and scores \[N, C\]"):
        postprocess(np.zeros((3, 5), np.float32), np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="boxes has 3 rows but scores has 2"):
        postprocess(np.zeros((3, 4), np.float32), np.zeros((2, 2), np.float32))


def test_postprocess_batch_checks_transform_count() -> None:
    boxes = np.zeros((2, 3, 4), np.float32)
    scores = np.zeros((2, 3, 1), np.float32)
    assert len(postprocess_batch(boxes, scores, [None, None])) == 2
    with pytest.raises(ValueError, match="1 transforms for a batch of 2"):
        postprocess_batch(boxes, scores, [None])


def test_boxes_of_zero_area_after_clipping_are_dropped_by_every_producer() -> None:
    """A box outside the image clips to zero width: host post-processing and the in-graph NMS
    outputs drop it alike, so a model's detections agree with themselves (a zero-area box has
    IoU 0 with itself: it made an export with --nms onnx --conf 0.005 fail its fp32 gate)."""
    from pgd_deploy.runtime.agreement import detection_agreement
    from pgd_deploy.runtime.backends import Backend
    from pgd_deploy.runtime.postprocess import drop_degenerate
    from pgd_deploy.structures import Detections

    tf = ImageTransform(1.0, 1.0, 32, 48, 32, 48)  # a 48x32 image, not resized
    boxes = np.array([[2, 2, 20, 20], [50, 4, 60, 12], [4, 40, 12, 44]], np.float32)  # 2 outside
    scores = np.array([[0.9], [0.8], [0.7]], np.float32)
    dets = postprocess(boxes, scores, tf, score_thresh=0.005)
    assert dets.boxes.tolist() == [[2, 2, 20, 20]]  # the two clipped to x = 48 / y = 32 dropped
    with_zero_area = Detections(tf.to_original(boxes), scores[:, 0], np.zeros(3, np.int64))
    assert detection_agreement([with_zero_area], [with_zero_area]) < 1.0  # why they must go
    assert detection_agreement([dets], [dets]) == 1.0

    class InGraph(Backend):  # the in-graph NMS branch of every runtime's post-processing
        postprocess_kwargs = {"score_thresh": 0.005, "max_det": 100}
        level_sizes = None

    outputs = {
        "det_boxes": boxes[None],
        "det_scores": scores[None, :, 0],
        "det_classes": np.zeros((1, 3), np.int64),
        "num_dets": np.array([[3]]),
    }
    (in_graph,) = InGraph.postprocess(InGraph.__new__(InGraph), outputs, [tf])
    assert in_graph.boxes.tolist() == dets.boxes.tolist()
    assert len(drop_degenerate(Detections(np.zeros((0, 4)), [], []))) == 0


def test_select_candidates_offsets_every_level_by_the_sizes_before_it() -> None:
    """Three levels of 2 locations: the third level's locations are 4 and 5."""
    scores = np.array([[0.9], [0.1], [0.2], [0.8], [0.3], [0.7]], np.float32)
    loc, lab, val = select_candidates(scores, 0.05, topk=1, level_sizes=[2, 2, 2])
    assert loc.tolist() == [0, 3, 5] and lab.tolist() == [0, 0, 0]
    assert val.tolist() == pytest.approx([0.9, 0.8, 0.7])


def test_boxes_are_clipped_to_the_letterboxed_content_on_every_side() -> None:
    tf = ImageTransform(1.0, 1.0, 40, 60, 40, 60)  # a 60x40 image, not resized
    boxes = np.array([[-5, -3, 20, 20], [50, 30, 70, 45]], np.float32)
    scores = np.array([[0.9], [0.8]], np.float32)
    dets = postprocess(boxes, scores, tf)
    assert dets.boxes.tolist() == [[0, 0, 20, 20], [50, 30, 60, 40]]


def test_postprocess_batch_maps_each_image_back_with_its_own_transform() -> None:
    boxes = np.array([[[10, 10, 20, 20]], [[10, 10, 20, 20]]], np.float32)
    scores = np.array([[[0.9]], [[0.9]]], np.float32)
    same = ImageTransform(1.0, 1.0, 64, 64, 64, 64)
    half = ImageTransform(0.5, 0.5, 128, 128, 64, 64)  # a 128 px image shrunk to 64
    first, second = postprocess_batch(boxes, scores, [same, half])
    assert first.boxes.tolist() == [[10, 10, 20, 20]]
    assert second.boxes.tolist() == [[20, 20, 40, 40]]
    with pytest.raises(ValueError, match="boxes has 3 rows but scores has 2$"):
        postprocess(np.zeros((3, 4), np.float32), np.zeros((2, 3), np.float32))
