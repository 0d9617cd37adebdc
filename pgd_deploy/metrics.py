"""Box metrics over detections from any backend (torch-free; pycocotools loaded lazily).

Two metrics, chosen by `data.metric`:
- `coco`: pycocotools' AP values, fractions in [0, 1] under `AP`, `AP50`, `AP75`, `APs`, `APm`,
  `APl`;
- `crowd`: CrowdHuman's MR^-2, AP and JI (`pgd_deploy.crowd_metrics`), fractions under `MR2`
  (lower is better), `AP` and `JI`, for one-class data with ignore regions (COCO `iscrowd`).
Both give an `AP` (higher is better), which picks the best checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pgd_deploy.structures import Detections

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
CROWD_KEYS = ("MR2", "AP", "JI")
METRICS = ("coco", "crowd")


def detections_to_coco(
    image_id: int, detections: Detections, category_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """COCO results entries (xywh boxes, original category ids) for one image."""
    out = []
    for box, score, label in zip(detections.boxes, detections.scores, detections.labels):
        x1, y1, x2, y2 = (float(v) for v in box)
        out.append(
            {
                "image_id": int(image_id),
                "category_id": int(category_ids[int(label)]),
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "score": round(float(score), 5),
            }
        )
    return out


def _load(obj: str | Path | dict | list, what: str) -> Any:
    if isinstance(obj, (dict, list)):
        return obj
    path = Path(obj)
    if not path.is_file():
        raise ValueError(f"{path}: {what} file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from None


def _validate_results(results: list, gt: dict, source: str) -> None:
    if not isinstance(results, list):
        raise ValueError(f"{source}: expected a JSON list of detections")
    image_ids = {img["id"] for img in gt.get("images", [])}
    cat_ids = {cat["id"] for cat in gt.get("categories", [])}
    bad_images, bad_cats = set(), set()
    for i, det in enumerate(results):
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in det:
                raise ValueError(f"{source}: entry [{i}] is missing field '{key}'")
        if det["image_id"] not in image_ids:
            bad_images.add(det["image_id"])
        if det["category_id"] not in cat_ids:
            bad_cats.add(det["category_id"])
    if bad_images:
        raise ValueError(
            f"{source}: field 'image_id' names {len(bad_images)} image(s) not in the annotations, "
            f"e.g. {sorted(bad_images)[:5]}"
        )
    if bad_cats:
        raise ValueError(
            f"{source}: field 'category_id' names unknown categories {sorted(bad_cats)[:10]} "
            f"(known: {sorted(cat_ids)[:10]}...)"
        )


def evaluate_coco(
    annotations: str | Path | dict,
    results: str | Path | list,
    *,
    image_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """pycocotools COCOeval (bbox) of `results` against `annotations`.

    Args:
        annotations: COCO ground truth (path or parsed dict).
        results: COCO results (path or list of {"image_id", "category_id", "bbox", "score"}).
        image_ids: evaluate on these images only (default: every annotated image).

    Returns:
        {"AP", "AP50", "AP75", "APs", "APm", "APl"} as fractions (-1 where undefined, e.g. no
        small objects).

    Raises:
        ValueError: unreadable files, or results naming unknown image or category ids.
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ImportError(
            "COCO evaluation needs pycocotools: pip install 'pgd-deploy[train]'"
        ) from None
    gt = _load(annotations, "annotation")
    dets = _load(results, "results")
    src = str(results) if isinstance(results, (str, Path)) else "results"
    _validate_results(dets, gt, src)
    ids = sorted({img["id"] for img in gt["images"]} if image_ids is None else set(image_ids))
    if not dets or not ids:
        return {k: 0.0 for k in AP_KEYS}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"info": {}, "licenses": [], **gt}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(list(dets))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(AP_KEYS, ev.stats[:6])}


def crowd_metrics(
    gt_records: Sequence[dict[str, Any]], detections: Iterable[dict[str, Any]], **kwargs: Any
) -> dict[str, float]:
    """MR^-2, AP and JI with CrowdHuman's definitions (`pgd_deploy.crowd_metrics`): odgt
    records and `{"ID", "box": [x, y, w, h], "score"}` detections in, `mr2`, `ap`, `ji` out."""
    from pgd_deploy.crowd_metrics import crowd_metrics as compute

    return compute(gt_records, detections, **kwargs)


def evaluate_crowd(
    annotations: str | Path | dict,
    results: str | Path | list,
    *,
    image_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """CrowdHuman's metrics of COCO `results` against one-class COCO `annotations` whose
    `iscrowd` boxes are ignore regions (`pgd-train data crowdhuman` writes such files).

    Returns:
        {"MR2", "AP", "JI"} as fractions (MR^-2 lower is better).

    Raises:
        ValueError: unreadable files, results naming unknown images or categories, more than
            one category, or no object to evaluate against.
    """
    from pgd_deploy.crowd_metrics import coco_crowd_records, crowd_id

    gt = _load(annotations, "annotation")
    dets = _load(results, "results")
    where = str(annotations) if isinstance(annotations, (str, Path)) else "annotations"
    _validate_results(dets, gt, str(results) if isinstance(results, (str, Path)) else "results")
    if len(gt.get("categories", [])) != 1:
        names = [c.get("name", c.get("id")) for c in gt.get("categories", [])][:5]
        raise ValueError(
            f"{where}: field 'categories': the crowd metrics (data.metric = 'crowd') evaluate "
            f"one class, found {len(gt.get('categories', []))} {names}"
        )
    records = coco_crowd_records(gt, image_ids)
    ids = {img["id"]: crowd_id(img) for img in gt["images"]}
    kept = {record["ID"] for record in records}
    detections = [
        {"ID": ids[d["image_id"]], "box": d["bbox"], "score": d["score"]}
        for d in dets
        if ids[d["image_id"]] in kept
    ]
    out = crowd_metrics(records, detections)
    return {"MR2": out["mr2"], "AP": out["ap"], "JI": out["ji"]}


def evaluate(
    annotations: str | Path | dict,
    results: str | Path | list,
    *,
    image_ids: Iterable[int] | None = None,
    metric: str = "coco",
) -> dict[str, float]:
    """`evaluate_coco` or `evaluate_crowd`, as `metric` ("coco" or "crowd") says."""
    if metric == "crowd":
        return evaluate_crowd(annotations, results, image_ids=image_ids)
    if metric == "coco":
        return evaluate_coco(annotations, results, image_ids=image_ids)
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def format_metrics(metrics: dict[str, float], title: str = "COCO bbox") -> str:
    """A small fixed-width table of the metrics (values in points, i.e. x100): COCO's six AP
    values, or MR^-2, AP and JI for the crowd metrics."""
    if "MR2" in metrics:
        header = f"{'MR^-2':>6} {'AP':>6} {'JI':>6}"
        row = " ".join(f"{100 * metrics[k]:6.1f}" for k in CROWD_KEYS)
        return f"{title.replace('COCO bbox', 'CrowdHuman')}\n{header}\n{row}"
    header = " ".join(f"{k:>6}" for k in AP_KEYS)
    row = " ".join(
        f"{100 * metrics[k]:6.1f}" if metrics.get(k, -1) >= 0 else f"{'-':>6}" for k in AP_KEYS
    )
    return f"{title}\n{header}\n{row}"
