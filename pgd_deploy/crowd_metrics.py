"""CrowdHuman metrics: log-average miss rate (MR^-2), AP and the Jaccard index (torch-free).

The definitions are those of CrowdDet's evaluation toolkit (`lib/evaluate`), which mmdetection's
`CrowdHumanMetric` reproduces and the PGD paper reports; the details below decide the numbers.

- Ground truth comes as odgt records (`{"ID", "gtboxes": [{"tag", "fbox", "vbox", "extra"}..],
  "width", "height"}`): a box tagged `person` whose `extra.ignore` is 0 (or absent) is an object,
  anything else (a `mask` tag, `extra.ignore != 0`) an ignore region. Boxes are x, y, w, h.
- Ground truth and detections are clipped to the image when the record has `width` and `height`
  (x1, y1 to [0, W - 1] / [0, H - 1]; x2, y2 to [0, W] / [0, H]), as the toolkit does.
- Matching for MR^-2 and AP (Caltech rules): per image, detections by descending score take the
  unmatched object of highest IoU if that IoU is > 0.5; a detection that matches none and covers an
  ignore region (intersection over the detection's own area > 0.5) is dropped, neither TP nor FP
  (one region can drop many); any other detection is a false positive.
- MR^-2: over all images pooled by score, miss rate = 1 - TP / objects and FPPI = FP / images; at
  each of `MR_REFERENCES` the miss rate at the first ranked detection whose FPPI reaches it (the
  last detection if none does); MR^-2 is their geometric mean. With no detections at all the
  toolkit returns NaN; here it is 1 (everything missed).
- AP: the trapezoid area over the successive (recall, precision) points of the ranked detections,
  from the first detection (not from recall 0, not COCO's 101 points): N perfect detections of N
  objects give 1 - 1/N, as the toolkit reports.
- JI: per image and score threshold (detections scoring strictly above it), a maximum one-to-one
  matching at IoU >= 0.5 gives k pairs; unmatched detections and objects that an ignore region
  covers (IoA > 0.5) leave n and m; ratio k / (m + n - k), averaged over the images with m or n
  non-zero; JI is the best over the thresholds `JI_THRESHOLDS`. The toolkit adds 1e-6 to the
  denominator (perfect detections give 0.999999); here the ratio is exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

MR_REFERENCES = (0.0100, 0.0178, 0.0316, 0.0562, 0.1000, 0.1778, 0.3162, 0.5623, 1.000)
JI_THRESHOLDS = tuple(i / 10 for i in range(10))
IOU_THRESH = 0.5
PERSON_TAG = "person"
BOX_KEYS = ("fbox", "vbox", "hbox")
_EPS = 1e-6  # the toolkit's floor on a union or an area


@dataclass
class CrowdImage:
    """One image's evaluation input: xyxy boxes in original pixels.

    objects: [G, 4]; ignore: [I, 4] ignore regions; boxes: [D, 4] detections by descending
    score (ties in input order); scores: [D].
    """

    image_id: str
    objects: np.ndarray
    ignore: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray

    @cached_property
    def iou(self) -> np.ndarray:
        """[D, G] IoU of the detections with the objects (computed once for MR^-2, AP and
        every JI threshold)."""
        return overlaps(self.boxes, self.objects)

    @cached_property
    def boxes_covered(self) -> np.ndarray:
        """[D] bool: the detections an ignore region covers (IoA > 0.5)."""
        return _covered(self.boxes, self.ignore)

    @cached_property
    def objects_covered(self) -> np.ndarray:
        """[G] bool: the objects an ignore region covers (IoA > 0.5)."""
        return _covered(self.objects, self.ignore)


def _xywh(value: Any, where: str, field: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ValueError(f"{where}: field '{field}' must be [x, y, w, h], got {value!r:.60}")
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: field '{field}' must hold 4 numbers, got {value!r:.60}"
        ) from None
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{where}: field '{field}' holds a non-finite number: {value!r:.60}")
    return out


def _to_xyxy(boxes: Sequence[Sequence[float]]) -> np.ndarray:
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out[:, 2:] += out[:, :2]
    return out


def clip_boxes(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """The toolkit's clipping of xyxy boxes: x1, y1 to [0, W - 1] / [0, H - 1], x2, y2 to
    [0, W] / [0, H] (a copy)."""
    out = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    out[:, 0] = np.clip(out[:, 0], 0, width - 1)
    out[:, 1] = np.clip(out[:, 1], 0, height - 1)
    out[:, 2] = np.clip(out[:, 2], 0, width)
    out[:, 3] = np.clip(out[:, 3], 0, height)
    return out


def is_ignore(entry: dict[str, Any]) -> bool:
    """An odgt gtbox that is not an object: a tag other than `person`, or `extra.ignore != 0`."""
    extra = entry.get("extra") or {}
    return entry.get("tag") != PERSON_TAG or bool(extra.get("ignore", 0))


def record_boxes(
    record: dict[str, Any], where: str, box_key: str = "fbox"
) -> tuple[np.ndarray, np.ndarray]:
    """(objects [G, 4], ignore regions [I, 4]) of one odgt record, xyxy, not clipped.

    Raises:
        ValueError: a gtbox without `tag` or without a valid `box_key`; names `where` and the box.
    """
    gtboxes = record.get("gtboxes", [])
    if not isinstance(gtboxes, list):
        raise ValueError(f"{where}: field 'gtboxes' must be a list, got {gtboxes!r:.60}")
    objects, ignore = [], []
    for j, entry in enumerate(gtboxes):
        at = f"{where} gtboxes[{j}]"
        if not isinstance(entry, dict) or "tag" not in entry:
            raise ValueError(f"{at}: expected an object with field 'tag'")
        box = _xywh(entry.get(box_key), at, box_key)
        (ignore if is_ignore(entry) else objects).append(box)
    return _to_xyxy(objects), _to_xyxy(ignore)


def _size(record: dict[str, Any], where: str) -> tuple[float, float] | None:
    width, height = record.get("width"), record.get("height")
    if width is None or height is None:
        return None
    if not all(isinstance(v, (int, float)) and v > 0 for v in (width, height)):
        raise ValueError(f"{where}: fields 'width' and 'height' must be positive numbers")
    return float(width), float(height)


def crowd_images(
    gt_records: Sequence[dict[str, Any]],
    detections: Iterable[dict[str, Any]],
    *,
    box_key: str = "fbox",
) -> list[CrowdImage]:
    """Group detections (`{"ID", "box": [x, y, w, h], "score"}`) under their odgt records.

    Raises:
        ValueError: a record without `ID` or seen twice, a detection naming an unknown ID, or a
            detection without a valid `box` / `score`.
    """
    order: dict[str, int] = {}
    for i, record in enumerate(gt_records):
        if not isinstance(record, dict) or "ID" not in record:
            raise ValueError(f"ground truth record {i}: missing field 'ID'")
        if str(record["ID"]) in order:
            raise ValueError(f"ground truth record {i}: ID {record['ID']!r} appears twice")
        order[str(record["ID"])] = i
    found: list[list[tuple[float, list[float]]]] = [[] for _ in order]
    for i, det in enumerate(detections):
        where = f"detection {i}"
        if not isinstance(det, dict) or "ID" not in det:
            raise ValueError(f"{where}: missing field 'ID'")
        index = order.get(str(det["ID"]))
        if index is None:
            raise ValueError(f"{where}: field 'ID' names {det['ID']!r}, not in the ground truth")
        score = det.get("score")
        if not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"{where}: field 'score' must be a finite number, got {score!r:.40}")
        found[index].append((float(score), _xywh(det.get("box"), where, "box")))
    images = []
    for record, dets in zip(gt_records, found):
        where = f"ground truth {record['ID']!r}"
        objects, ignore = record_boxes(record, where, box_key)
        dets.sort(key=lambda d: d[0], reverse=True)  # stable: ties keep their input order
        boxes = _to_xyxy([box for _, box in dets])
        size = _size(record, where)
        if size is not None:
            objects, ignore, boxes = (clip_boxes(b, *size) for b in (objects, ignore, boxes))
        scores = np.asarray([score for score, _ in dets], dtype=np.float64)
        images.append(CrowdImage(str(record["ID"]), objects, ignore, boxes, scores))
    return images


def overlaps(boxes: np.ndarray, others: np.ndarray, *, over_first: bool = False) -> np.ndarray:
    """[N, M] IoU of xyxy boxes, or with `over_first` the intersection over the area of each
    of `boxes` (IoA); unions and areas floored at 1e-6 as the toolkit does."""
    if len(boxes) == 0 or len(others) == 0:
        return np.zeros((len(boxes), len(others)))
    lt = np.maximum(boxes[:, None, :2], others[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], others[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=-1)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    if over_first:
        return inter / np.maximum(area[:, None], _EPS)
    other_area = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / np.maximum(area[:, None] + other_area[None, :] - inter, _EPS)


def match_caltech(image: CrowdImage) -> list[tuple[float, bool]]:
    """(score, is_true_positive) of each detection that counts, by descending score; those that
    match no object and cover an ignore region are left out."""
    taken = np.zeros(len(image.objects), dtype=bool)
    out = []
    for i, score in enumerate(image.scores):
        candidates = np.where(taken, -1.0, image.iou[i])  # [G]
        best = int(np.argmax(candidates)) if len(candidates) else -1
        if best >= 0 and candidates[best] > IOU_THRESH:
            taken[best] = True
            out.append((float(score), True))
        elif not image.boxes_covered[i]:
            out.append((float(score), False))
    return out


def _ranked(images: Sequence[CrowdImage]) -> list[tuple[float, bool]]:
    ranked = [item for image in images for item in match_caltech(image)]
    ranked.sort(key=lambda item: item[0], reverse=True)  # stable: the toolkit's order on ties
    return ranked


def miss_rate(ranked: Sequence[tuple[float, bool]], num_objects: int, num_images: int) -> float:
    """MR^-2 (a fraction) of the ranked (score, is_tp) list; 1 when there is no detection."""
    if not ranked:
        return 1.0
    tp = np.cumsum([hit for _, hit in ranked])
    fp = np.cumsum([not hit for _, hit in ranked])
    misses = 1.0 - tp / num_objects
    fppi = fp / num_images
    picked = []
    for ref in MR_REFERENCES:
        reached = np.nonzero(fppi >= ref)[0]
        picked.append(misses[reached[0]] if len(reached) else misses[-1])
    with np.errstate(divide="ignore"):
        return float(np.exp(np.log(np.asarray(picked)).mean()))


def average_precision(ranked: Sequence[tuple[float, bool]], num_objects: int) -> float:
    """The toolkit's AP: trapezoids between successive (recall, precision) points."""
    if not ranked:
        return 0.0
    tp = np.cumsum([hit for _, hit in ranked], dtype=np.float64)
    precision = tp / np.arange(1, len(ranked) + 1)
    recall = tp / num_objects
    return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2))


def _covered(boxes: np.ndarray, ignore: np.ndarray) -> np.ndarray:
    """[N] bool: each box's intersection over its own area with some ignore region > 0.5."""
    if len(boxes) == 0 or len(ignore) == 0:
        return np.zeros(len(boxes), dtype=bool)
    return overlaps(boxes, ignore, over_first=True).max(axis=1) > IOU_THRESH


def _max_matching(iou: np.ndarray) -> np.ndarray:
    """For each detection, its object in a maximum matching over IoU >= 0.5 (or -1): scipy's
    Hopcroft-Karp, as the toolkit uses."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    edges = np.where(iou >= IOU_THRESH, iou, 0.0)
    return maximum_bipartite_matching(csr_matrix(edges), perm_type="column")


def image_jaccard(image: CrowdImage, score_thresh: float) -> tuple[float, int, int]:
    """(ratio k / (m + n - k), m, n) of one image at one score threshold."""
    kept = image.scores > score_thresh
    count = int(kept.sum())
    if count and len(image.objects):
        match = _max_matching(image.iou[kept])
    else:
        match = np.full(count, -1)
    matched = match >= 0
    k = int(matched.sum())
    free_objects = np.ones(len(image.objects), dtype=bool)
    free_objects[match[matched]] = False
    n = count - int(image.boxes_covered[kept][~matched].sum())
    m = len(image.objects) - int(image.objects_covered[free_objects].sum())
    union = m + n - k
    return (k / union if union > 0 else 0.0), m, n


def jaccard_index(images: Sequence[CrowdImage]) -> tuple[float, float]:
    """(JI, the score threshold that gives it): the best over `JI_THRESHOLDS` of the mean ratio
    over the images with an object or a detection left (1 where no image has either)."""
    best, best_thresh = -1.0, JI_THRESHOLDS[0]
    for thresh in JI_THRESHOLDS:
        ratios = [image_jaccard(image, thresh) for image in images]
        counted = sum(1 for _, m, n in ratios if m or n)
        mean = sum(r for r, _, _ in ratios) / counted if counted else 1.0
        if mean > best:
            best, best_thresh = mean, thresh
    return best, best_thresh


def crowd_metrics(
    gt_records: Sequence[dict[str, Any]],
    detections: Iterable[dict[str, Any]],
    *,
    box_key: str = "fbox",
) -> dict[str, float]:
    """MR^-2, AP and JI of `detections` against odgt `gt_records` (see the module docstring).

    Args:
        gt_records: odgt records as read from the file (`ID`, `gtboxes`, optional `width` and
            `height`), one per evaluated image.
        detections: `{"ID", "box": [x, y, w, h], "score"}` in original pixels, any order.
        box_key: the ground-truth box evaluated: `fbox` (full body, the paper's) or `vbox`.

    Returns:
        `mr2`, `ap`, `ji` (fractions; MR^-2 lower is better), `ji_score_thresh`, and the counts
        `images`, `objects`, `ignore`, `detections`.

    Raises:
        ValueError: malformed records or detections (named), or no object to evaluate against.
    """
    if box_key not in BOX_KEYS:
        raise ValueError(f"box_key must be one of {BOX_KEYS}, got {box_key!r}")
    images = crowd_images(gt_records, detections, box_key=box_key)
    num_objects = sum(len(image.objects) for image in images)
    if num_objects == 0:
        raise ValueError(
            f"no '{PERSON_TAG}' box to evaluate against in {len(images)} ground truth records"
        )
    ranked = _ranked(images)
    ji, ji_thresh = jaccard_index(images)
    return {
        "mr2": miss_rate(ranked, num_objects, len(images)),
        "ap": average_precision(ranked, num_objects),
        "ji": ji,
        "ji_score_thresh": ji_thresh,
        "images": float(len(images)),
        "objects": float(num_objects),
        "ignore": float(sum(len(image.ignore) for image in images)),
        "detections": float(sum(len(image.boxes) for image in images)),
    }


def coco_crowd_records(
    coco: dict[str, Any], image_ids: Iterable[int] | None = None
) -> list[dict[str, Any]]:
    """odgt-style ground truth of a COCO dict: one record per image (in `image_ids` when given),
    its ID the image's `crowd_id` (odgt conversions keep it) or its id; `iscrowd` boxes become
    ignore regions (tag `mask`), every other box an object (tag `person`)."""
    keep = None if image_ids is None else set(image_ids)
    images = [img for img in coco["images"] if keep is None or img["id"] in keep]
    by_image: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in images}
    for ann in coco["annotations"]:
        if ann["image_id"] in by_image:
            tag = "mask" if ann.get("iscrowd", 0) else PERSON_TAG
            by_image[ann["image_id"]].append({"tag": tag, "fbox": list(ann["bbox"])})
    return [
        {
            "ID": crowd_id(img),
            "width": img["width"],
            "height": img["height"],
            "gtboxes": by_image[img["id"]],
        }
        for img in images
    ]


def crowd_id(image: dict[str, Any]) -> str:
    """The odgt ID of a COCO image entry: its `crowd_id`, else its id."""
    return str(image.get("crowd_id", image["id"]))
