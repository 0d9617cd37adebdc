"""Post-processing of dense-detector outputs in numpy, shared by every backend.

Input is the fixed export contract: decoded xyxy boxes [N, 4] in network-input pixels and
per-class scores [N, C] for one image (N = all locations of all levels, P3 first). Output is a
`Detections` in original-image pixels. The PyTorch evaluation path calls the same code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pgd_deploy.runtime.defaults import MAX_DETECTIONS, NMS_THRESH, SCORE_THRESH, TOPK_CANDIDATES
from pgd_deploy.runtime.preprocess import ImageTransform
from pgd_deploy.structures import Detections


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Areas of xyxy boxes [N, 4] -> [N] (degenerate boxes have area 0)."""
    return (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes a [N, 4] and b [M, 4] -> [N, M]."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # [N, M, 2]
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # [N, M, 2]
    wh = (rb - lt).clip(0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / np.maximum(union, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thresh: float) -> np.ndarray:
    """Greedy NMS. Returns the indices kept, in decreasing score order."""
    order = np.argsort(-scores, kind="stable")
    boxes = np.asarray(boxes, dtype=np.float32)
    areas = box_area(boxes)
    keep: list[int] = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        if order.size == 1:
            break
        rest = order[1:]
        lt = np.maximum(boxes[i, :2], boxes[rest, :2])
        rb = np.minimum(boxes[i, 2:], boxes[rest, 2:])
        wh = (rb - lt).clip(0)
        inter = wh[:, 0] * wh[:, 1]
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[iou <= iou_thresh]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_thresh: float
) -> np.ndarray:
    """Class-aware NMS: boxes of different labels never suppress each other."""
    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    # Shift each class into its own coordinate range (torchvision's trick): one NMS call.
    span = float(boxes.max() - boxes.min()) + 1.0
    offset = labels.astype(np.float32) * span
    return nms(boxes + offset[:, None], scores, iou_thresh)


def select_candidates(
    scores: np.ndarray,
    score_thresh: float,
    topk: int,
    level_sizes: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattened (location, class) candidates above the threshold, top-k per level.

    Args:
        scores: [N, C] per-class scores.
        score_thresh: minimum score.
        topk: candidates kept per level (per image when `level_sizes` is None).
        level_sizes: locations per level, summing to N, or None for one level.

    Returns:
        (location indices [M], labels [M], scores [M]).
    """
    num_classes = scores.shape[1]
    sizes = list(level_sizes) if level_sizes else [scores.shape[0]]
    if sum(sizes) != scores.shape[0]:
        raise ValueError(f"level_sizes sum to {sum(sizes)}, but scores has {scores.shape[0]} rows")
    locs, labels, vals = [], [], []
    start = 0
    for n in sizes:
        flat = scores[start : start + n].reshape(-1)  # [n * C]
        idx = np.flatnonzero(flat > score_thresh)
        if idx.size > topk:
            part = np.argpartition(-flat[idx], topk - 1)[:topk]
            idx = idx[part]
        locs.append(idx // num_classes + start)
        labels.append(idx % num_classes)
        vals.append(flat[idx])
        start += n
    return np.concatenate(locs), np.concatenate(labels), np.concatenate(vals)


def postprocess(
    boxes: np.ndarray,
    scores: np.ndarray,
    transform: ImageTransform | None = None,
    *,
    score_thresh: float = SCORE_THRESH,
    nms_thresh: float = NMS_THRESH,
    topk_candidates: int = TOPK_CANDIDATES,
    max_det: int = MAX_DETECTIONS,
    level_sizes: Sequence[int] | None = None,
) -> Detections:
    """Threshold, top-k per level, clip, class-aware NMS and un-letterbox one image; boxes of
    zero width or height are dropped (`drop_degenerate`).

    Args:
        boxes: float [N, 4] decoded xyxy boxes in network-input pixels.
        scores: float [N, C] per-class scores in [0, 1].
        transform: how the image was letterboxed; None keeps network coordinates.
        score_thresh, nms_thresh, topk_candidates, max_det: see `ModelConfig`.
        level_sizes: locations per FPN level (top-k is per level when given).

    Returns:
        Detections sorted by decreasing score, at most `max_det`.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.ndim != 2:
        raise ValueError(
            f"expected boxes [N, 4] and scores [N, C], got {boxes.shape}, {scores.shape}"
        )
    if boxes.shape[0] != scores.shape[0]:
        raise ValueError(f"boxes has {boxes.shape[0]} rows but scores has {scores.shape[0]}")
    loc, labels, vals = select_candidates(scores, score_thresh, topk_candidates, level_sizes)
    cand = boxes[loc]
    if transform is not None:
        cand[:, 0::2] = cand[:, 0::2].clip(0, transform.resized_w)
        cand[:, 1::2] = cand[:, 1::2].clip(0, transform.resized_h)
    keep = batched_nms(cand, vals, labels, nms_thresh)[:max_det]
    out = cand[keep]
    if transform is not None:
        out = transform.to_original(out)
    return drop_degenerate(Detections(out, vals[keep], labels[keep]))


def drop_degenerate(dets: Detections) -> Detections:
    """`dets` without the boxes of zero width or height (after clipping to the image).

    Such a box covers no pixel and has IoU 0 with everything, itself included, so it could never
    be matched by the agreement gate nor suppress anything in NMS; every producer of detections
    drops it after NMS and the `max_det` cut (host post-processing, PyTorch, the in-graph NMS
    outputs), so all of them keep the same set.
    """
    keep = (dets.boxes[:, 2] > dets.boxes[:, 0]) & (dets.boxes[:, 3] > dets.boxes[:, 1])
    return (
        dets if keep.all() else Detections(dets.boxes[keep], dets.scores[keep], dets.labels[keep])
    )


def postprocess_batch(
    boxes: np.ndarray,
    scores: np.ndarray,
    transforms: Sequence[ImageTransform | None],
    **kwargs,
) -> list[Detections]:
    """`postprocess` over a batch: boxes [B, N, 4], scores [B, N, C]."""
    if len(transforms) != boxes.shape[0]:
        raise ValueError(f"{len(transforms)} transforms for a batch of {boxes.shape[0]}")
    return [
        postprocess(boxes[i], scores[i], transforms[i], **kwargs) for i in range(len(transforms))
    ]
