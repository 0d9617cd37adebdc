"""COCO annotation loading with validation (no torch, no pycocotools).

Category ids map to contiguous 0-based class indices (sorted by id) and back; crowd boxes are
excluded from training targets; images without annotations are kept (`CocoAnnotations.annotated`
drops them, as MMDetection's `filter_empty_gt`); degenerate boxes (zero or negative width/height,
or below `min_box_size`) are dropped and counted. Every structural problem (including NaN or
Infinity in a box) raises `ValueError` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class ImageRecord:
    """One image and its training targets (crowd and degenerate boxes removed).

    boxes: float32 [G, 4] xyxy original pixels; labels: int64 [G] contiguous class indices.
    """

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    annotations: int = 0  # annotations of the image in the file, crowd and dropped boxes included


@dataclass
class CocoAnnotations:
    """A validated COCO annotation file."""

    path: Path
    images: list[ImageRecord]
    category_ids: list[int]  # contiguous index -> COCO category id
    class_names: list[str]  # contiguous index -> name
    raw: dict[str, Any] = field(repr=False)  # the parsed JSON (for pycocotools evaluation)
    num_crowd: int = 0
    num_degenerate: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def annotated(self) -> CocoAnnotations:
        """Only the images with at least one annotation of any kind (crowd and dropped boxes
        count): MMDetection's `filter_empty_gt` rule for training (`data.filter_empty`)."""
        return dataclasses.replace(self, images=[r for r in self.images if r.annotations > 0])

    def subset(self, count: int) -> CocoAnnotations:
        """The first `count` images (all when count <= 0), for quick evaluation."""
        if count <= 0 or count >= len(self.images):
            return self
        return CocoAnnotations(
            self.path,
            self.images[:count],
            self.category_ids,
            self.class_names,
            self.raw,
            self.num_crowd,
            self.num_degenerate,
        )


def _require(obj: dict, key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise ValueError(f"{where}: missing field '{key}'")
    if not isinstance(obj[key], kind):
        raise ValueError(f"{where}: field '{key}' must be a {kind.__name__}, got {obj[key]!r:.60}")
    return obj[key]


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: annotation file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'images' and 'annotations'")
    return data


def load_coco(
    path: str | Path, image_dir: str | Path | None = None, *, min_box_size: float = 0.0
) -> CocoAnnotations:
    """Load and validate a COCO detection annotation file.

    Args:
        path: the JSON file.
        image_dir: when given, every referenced image must exist there.
        min_box_size: boxes narrower or shorter than this (px) are dropped as degenerate too
            (MMDetection drops those under 1 px: `data.min_box_size = 1`).

    Raises:
        ValueError: missing fields, references to unknown images/categories, malformed boxes or
            missing image files; the message names the file and the field.
    """
    path = Path(path)
    data = read_json(path)
    images = _require(data, "images", list, str(path))
    annotations = _require(data, "annotations", list, str(path))
    categories = _require(data, "categories", list, str(path))
    cat_ids, names = _categories(path, categories)
    records = _image_records(path, images)
    num_crowd, num_degenerate = _add_annotations(path, annotations, records, cat_ids, min_box_size)
    if image_dir is not None:
        _check_files(path, Path(image_dir), records)
    out = [
        ImageRecord(
            image_id=iid,
            file_name=r["file_name"],
            width=r["width"],
            height=r["height"],
            boxes=np.asarray(r["boxes"], dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(r["labels"], dtype=np.int64),
            annotations=r["annotations"],
        )
        for iid, r in records.items()
    ]
    if num_degenerate:
        logger.warning(
            "%s: dropped %d degenerate boxes (width or height <= 0 or < %g px)",
            path,
            num_degenerate,
            min_box_size,
        )
    return CocoAnnotations(
        path, out, cat_ids, [names[c] for c in cat_ids], data, num_crowd, num_degenerate
    )


def _categories(path: Path, categories: list[Any]) -> tuple[list[int], dict[int, str]]:
    """(sorted category ids, id -> name); each entry needs an integer 'id'."""
    if not categories:
        raise ValueError(f"{path}: field 'categories' is empty")
    names: dict[int, str] = {}
    for i, cat in enumerate(categories):
        cid = _require(cat, "id", int, f"{path}: categories[{i}]")
        names[cid] = str(cat.get("name", cid))
    return sorted(names), names


def _image_records(path: Path, images: list[Any]) -> dict[int, dict[str, Any]]:
    """image id -> its fields, with empty box and label lists to fill."""
    records: dict[int, dict[str, Any]] = {}
    for i, img in enumerate(images):
        where = f"{path}: images[{i}]"
        iid = _require(img, "id", int, where)
        records[iid] = {
            "file_name": _require(img, "file_name", str, where),
            "width": _require(img, "width", int, where),
            "height": _require(img, "height", int, where),
            "boxes": [],
            "labels": [],
            "annotations": 0,
        }
    return records


def _add_annotations(
    path: Path,
    annotations: list[Any],
    records: dict[int, dict[str, Any]],
    cat_ids: list[int],
    min_box_size: float,
) -> tuple[int, int]:
    """Check every annotation and add its box (xyxy) and contiguous label to its image; crowd
    and degenerate boxes are counted, not added. Returns (crowd, degenerate) counts."""
    index_of = {cid: k for k, cid in enumerate(cat_ids)}
    num_crowd = num_degenerate = 0
    for i, ann in enumerate(annotations):
        where = f"{path}: annotations[{i}] (id {ann.get('id', '?')})"
        iid = _require(ann, "image_id", int, where)
        cid = _require(ann, "category_id", int, where)
        bbox = _require(ann, "bbox", list, where)
        if iid not in records:
            raise ValueError(f"{where}: field 'image_id' refers to unknown image {iid}")
        if cid not in index_of:
            raise ValueError(f"{where}: field 'category_id' refers to unknown category {cid}")
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
            raise ValueError(f"{where}: field 'bbox' must be [x, y, width, height], got {bbox}")
        if not all(math.isfinite(v) for v in bbox):  # Python's JSON reads NaN and Infinity
            raise ValueError(f"{where}: field 'bbox' must hold finite numbers, got {bbox}")
        records[iid]["annotations"] += 1
        if ann.get("iscrowd", 0):
            num_crowd += 1
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0 or w < min_box_size or h < min_box_size:
            num_degenerate += 1
            continue
        records[iid]["boxes"].append([x, y, x + w, y + h])
        records[iid]["labels"].append(index_of[cid])
    return num_crowd, num_degenerate


def _check_files(path: Path, image_dir: Path, records: dict[int, dict[str, Any]]) -> None:
    if not image_dir.is_dir():
        raise ValueError(f"{path}: image folder {image_dir} not found")
    missing = [
        r["file_name"] for r in records.values() if not (image_dir / r["file_name"]).is_file()
    ]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} image(s) listed in field 'images' are missing from "
            f"{image_dir}, e.g. {missing[:3]}"
        )
