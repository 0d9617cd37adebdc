"""CrowdHuman's odgt annotations -> COCO JSON with ignore regions (torch-free).

An odgt file holds one JSON record per line: `{"ID": "273271,c9db000d5146c15", "gtboxes":
[{"tag": "person", "fbox": [x, y, w, h], "vbox": [...], "hbox": [...], "extra": {"ignore": 0}},
...]}`. The conversion keeps one box per entry (`fbox`, the full body, by default; `vbox` the
visible part) and follows the official PGD data preparation:

- an entry tagged `person` with `extra.ignore` 0 (or absent) is an object; any other (a `mask`
  tag, `extra.ignore != 0`) is an ignore region, written with `iscrowd = 1`: never a training
  positive, and never a false positive in the crowd evaluation (`data.metric = "crowd"`);
- full-body boxes reach beyond the image: they are clipped to it as the evaluation toolkit clips
  ground truth and detections (x1, y1 to [0, W - 1] / [0, H - 1]; x2, y2 to [0, W] / [0, H]);
- each COCO image keeps its odgt `ID` as `crowd_id`, so results map back to the records.

A malformed line is refused with its line number and field, as the COCO loader refuses a
malformed annotation.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from pgd_deploy.crowd_metrics import BOX_KEYS, PERSON_TAG, clip_boxes, is_ignore
from pgd_deploy.data.yolo import image_size
from pgd_deploy.io_utils import write_json

logger = logging.getLogger(__name__)

CATEGORY = {"id": 1, "name": PERSON_TAG}


def _check_box(value: Any, where: str, key: str) -> list[float]:
    if (
        not isinstance(value, list)
        or len(value) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"{where}: field '{key}' must be [x, y, w, h], got {value!r:.80}")
    if not all(math.isfinite(v) for v in value):
        raise ValueError(f"{where}: field '{key}' must hold finite numbers, got {value!r:.80}")
    return [float(v) for v in value]


def _check_record(record: Any, where: str, box_key: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with 'ID' and 'gtboxes'")
    if not isinstance(record.get("ID"), str) or not record["ID"]:
        raise ValueError(f"{where}: field 'ID' must be a non-empty string")
    gtboxes = record.get("gtboxes")
    if not isinstance(gtboxes, list):
        raise ValueError(f"{where}: field 'gtboxes' must be a list, got {gtboxes!r:.60}")
    for j, entry in enumerate(gtboxes):
        at = f"{where}: gtboxes[{j}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("tag"), str):
            raise ValueError(f"{at}: field 'tag' must be a string")
        extra = entry.get("extra", {})
        if not isinstance(extra, dict):
            raise ValueError(f"{at}: field 'extra' must be an object, got {extra!r:.60}")
        _check_box(entry.get(box_key), at, box_key)
    return record


def read_odgt(path: str | Path, *, box_key: str = "fbox") -> list[dict[str, Any]]:
    """The records of an odgt file, each checked (blank lines are skipped).

    Raises:
        ValueError: the file is missing, or a line is not a JSON record with a string `ID`
            (seen once), a `gtboxes` list and, in each entry, a `tag` and a 4-number `box_key`;
            the message names `path:line` and the field.
    """
    path = Path(path)
    if box_key not in BOX_KEYS:
        raise ValueError(f"box must be one of {BOX_KEYS}, got {box_key!r}")
    if not path.is_file():
        raise ValueError(f"{path}: odgt file not found")
    records, seen = [], {}
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
            _check_record(record, where, box_key)
            if record["ID"] in seen:
                raise ValueError(
                    f"{where}: ID {record['ID']!r} already appears on line {seen[record['ID']]}"
                )
            seen[record["ID"]] = line_no
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _image_entry(record: dict[str, Any], index: int, images: Path, suffix: str) -> dict[str, Any]:
    name = f"{record['ID']}{suffix}"
    file = images / name
    if not file.is_file():
        raise ValueError(f"image {file} of odgt record {record['ID']!r} not found")
    width, height = image_size(file)
    return {
        "id": index,
        "file_name": name,
        "width": width,
        "height": height,
        "crowd_id": record["ID"],
    }


def _annotations(
    record: dict[str, Any], image: dict[str, Any], box_key: str, start: int
) -> tuple[list[dict[str, Any]], int]:
    """The COCO annotations of one record's boxes, clipped to the image; and how many were."""
    out, clipped = [], 0
    for entry in record["gtboxes"]:
        x, y, w, h = (float(v) for v in entry[box_key])
        raw = np.array([[x, y, x + w, y + h]])
        inside = clip_boxes(raw, image["width"], image["height"])
        clipped += int(not np.array_equal(raw, inside))
        x1, y1, x2, y2 = inside[0].tolist()
        box = [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]
        out.append(
            {
                "id": start + len(out),
                "image_id": image["id"],
                "category_id": CATEGORY["id"],
                "bbox": box,
                "area": round(box[2] * box[3], 2),
                "iscrowd": int(is_ignore(entry)),
            }
        )
    return out, clipped


def odgt_to_coco(
    odgt: str | Path,
    images: str | Path,
    out: str | Path,
    *,
    box_key: str = "fbox",
    suffix: str = ".jpg",
) -> dict[str, int]:
    """Write the COCO JSON of an odgt file (one class, `person`; ignore regions as iscrowd).

    Args:
        odgt: the annotation file (e.g. CrowdHuman's `annotation_train.odgt`).
        images: the folder holding `<ID><suffix>` for every record.
        out: the COCO JSON to write (atomically).
        box_key: `fbox` (full body, the paper's) or `vbox` (visible part).

    Returns:
        counts: images, objects, ignore regions, boxes clipped to their image.

    Raises:
        ValueError: a malformed record (file and line named) or a missing image.
    """
    images = Path(images)
    if not images.is_dir():
        raise ValueError(f"{images}: images folder not found")
    records = read_odgt(odgt, box_key=box_key)
    coco_images, annotations = [], []
    clipped = 0
    for index, record in enumerate(records, start=1):
        image = _image_entry(record, index, images, suffix)
        anns, count = _annotations(record, image, box_key, len(annotations) + 1)
        clipped += count
        coco_images.append(image)
        annotations += anns
    write_json(out, {"images": coco_images, "annotations": annotations, "categories": [CATEGORY]})
    ignore = sum(a["iscrowd"] for a in annotations)
    summary = {
        "images": len(coco_images),
        "objects": len(annotations) - ignore,
        "ignore": ignore,
        "clipped": clipped,
    }
    logger.info("wrote %s: %s", out, summary)
    return summary
