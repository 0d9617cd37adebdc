"""The built-in synthetic "shapes" detection dataset (numpy + PIL only).

Filled shapes of several classes, sizes and colours, partly overlapping, on textured backgrounds
(smooth colour gradients, noise and distractor strokes). Everything is deterministic from the seed:
image i of a split depends only on (seed, split, i), so a larger dataset extends a smaller one.

Layout written by `generate_shapes(out, ...)`:
    out/train/000000.jpg ...  out/val/000000.jpg ...
    out/annotations/train.json, out/annotations/val.json   (COCO format, category ids from 1)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pgd_deploy.io_utils import atomic_open, atomic_write_text

logger = logging.getLogger(__name__)

SHAPE_CLASSES = ("circle", "square", "triangle", "star", "cross")
_SPLIT_ID = {"train": 1, "val": 2}


@dataclass(frozen=True)
class ShapesSpec:
    """Difficulty knobs of the synthetic data (the defaults are what the demo was tuned on)."""

    size: int = 128  # image side, px
    num_classes: int = 3  # first N of SHAPE_CLASSES
    min_objects: int = 1  # objects per image, inclusive range
    max_objects: int = 3
    min_rel_size: float = 0.18  # object side as a fraction of the image side
    max_rel_size: float = 0.5
    max_overlap: float = 0.35  # maximum IoU between two objects' boxes
    noise: float = 8.0  # std of the background pixel noise (0-255 scale)
    distractors: int = 2  # random strokes per image (not objects)


def background(rng: np.random.Generator, spec: ShapesSpec) -> Image.Image:
    s = spec.size
    c0, c1 = rng.uniform(40, 215, size=3), rng.uniform(40, 215, size=3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:s, 0:s] / max(s - 1, 1)
    t = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3.0  # [s, s] in (0, 1)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    img += rng.normal(0, spec.noise, size=(s, s, 3))
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(spec.distractors):
        pts = [tuple(rng.uniform(0, s, size=2)) for _ in range(3)]
        colour = tuple(int(v) for v in rng.uniform(0, 255, size=3))
        draw.line(pts, fill=colour, width=int(rng.integers(1, 3)))
    return pil.filter(ImageFilter.GaussianBlur(radius=0.6))


def _polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        angles = [rot + k * 2 * math.pi / 3 for k in range(3)]
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
    if kind == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = rot + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    raise ValueError(kind)


def _draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, box: tuple[float, float, float, float], colour, rng
) -> tuple[float, float, float, float]:
    """Draw `kind` inside `box`; return the tight box of what was drawn."""
    x1, y1, x2, y2 = box
    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
    if kind == "circle":
        draw.ellipse(box, fill=colour)
        return box
    if kind == "square":
        draw.rectangle(box, fill=colour)
        return box
    if kind == "cross":
        arm = r * 0.35
        draw.rectangle((x1, cy - arm, x2, cy + arm), fill=colour)
        draw.rectangle((cx - arm, y1, cx + arm, y2), fill=colour)
        return box
    pts = _polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi))
    draw.polygon(pts, fill=colour)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return (min(xs), min(ys), max(xs), max(ys))


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def render_image(
    seed: int, split: str, index: int, spec: ShapesSpec = ShapesSpec()
) -> tuple[Image.Image, list[tuple[int, list[float]]]]:
    """One synthetic image and its objects [(class index, [x1, y1, x2, y2]), ...]."""
    if not 1 <= spec.num_classes <= len(SHAPE_CLASSES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPE_CLASSES)}, got {spec.num_classes}")
    rng = np.random.default_rng([seed, _SPLIT_ID[split], index])
    img = background(rng, spec)
    draw = ImageDraw.Draw(img)
    s = spec.size
    objects: list[tuple[int, list[float]]] = []
    for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
        for _attempt in range(20):
            side = rng.uniform(spec.min_rel_size, spec.max_rel_size) * s
            x1, y1 = rng.uniform(0, s - side, size=2)
            box = (x1, y1, x1 + side, y1 + side)
            if all(_iou(box, o[1]) <= spec.max_overlap for o in objects):
                break
        else:
            continue
        cls = int(rng.integers(0, spec.num_classes))
        bg = np.asarray(img.getpixel((int(x1 + side / 2), int(y1 + side / 2))), dtype=float)
        colour = rng.uniform(0, 255, size=3)
        while np.abs(colour - bg).sum() < 150:  # keep every object visible against its background
            colour = rng.uniform(0, 255, size=3)
        tight = _draw_shape(draw, SHAPE_CLASSES[cls], box, tuple(int(c) for c in colour), rng)
        objects.append((cls, [float(v) for v in tight]))
    return img, objects


def coco_split(
    split: str, count: int, seed: int, spec: ShapesSpec
) -> tuple[list[Image.Image], dict]:
    """The first `count` images of a synthetic split, rendered in memory, and their COCO dict
    (the same ids, boxes and categories that `generate_shapes` writes)."""
    rendered, images, annotations = [], [], []
    for i in range(count):
        img, objects = render_image(seed, split, i, spec)
        rendered.append(img)
        name = f"{i:06d}.jpg"
        images.append({"id": i + 1, "file_name": name, "width": spec.size, "height": spec.size})
        for cls, (x1, y1, x2, y2) in objects:
            w, h = x2 - x1, y2 - y1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": cls + 1,
                    "bbox": [round(x1, 2), round(y1, 2), round(w, 2), round(h, 2)],
                    "area": round(w * h, 2),
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": k + 1, "name": SHAPE_CLASSES[k], "supercategory": "shape"}
        for k in range(spec.num_classes)
    ]
    return rendered, {"images": images, "annotations": annotations, "categories": categories}


def _coco_split(out: Path, split: str, count: int, seed: int, spec: ShapesSpec) -> dict:
    img_dir = out / split
    img_dir.mkdir(parents=True, exist_ok=True)
    rendered, coco = coco_split(split, count, seed, spec)
    for img, record in zip(rendered, coco["images"]):
        with atomic_open(img_dir / record["file_name"]) as fh:
            img.save(fh, format="JPEG", quality=92)
    return coco


def generate_shapes(
    out: str | Path,
    *,
    train: int = 400,
    val: int = 100,
    seed: int = 0,
    spec: ShapesSpec = ShapesSpec(),
) -> Path:
    """Write the synthetic dataset under `out` (see the module docstring). Returns `out`."""
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("val", val)):
        coco = _coco_split(out, split, count, seed, spec)
        # written last, atomically: marks the split done
        atomic_write_text(out / "annotations" / f"{split}.json", json.dumps(coco))
    logger.info("synthetic shapes: %d train + %d val images in %s", train, val, out)
    return out


def ensure_shapes(
    cache_dir: str | Path, *, train: int, val: int, seed: int, spec: ShapesSpec = ShapesSpec()
) -> Path:
    """The synthetic dataset for these parameters, generated on first use into `cache_dir`."""
    digest = hashlib.sha1(repr(spec).encode()).hexdigest()[:8]  # any knob change -> new data
    key = f"shapes_s{spec.size}_c{spec.num_classes}_n{train}-{val}_seed{seed}_{digest}"
    return ensure_generated(
        Path(cache_dir) / key,
        lambda tmp: generate_shapes(tmp, train=train, val=val, seed=seed, spec=spec),
    )


def ensure_generated(out: Path, generate: Callable[[Path], object]) -> Path:
    """`out`, written by `generate(folder)` on first use: a dataset is complete when its
    `annotations/{train,val}.json` exist. It is generated beside `out` and renamed into place,
    so concurrent callers never see half a dataset."""
    if all((out / "annotations" / f"{s}.json").is_file() for s in ("train", "val")):
        return out
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    generate(tmp)
    if out.exists():  # an incomplete leftover, or another process won the race
        if all((out / "annotations" / f"{s}.json").is_file() for s in ("train", "val")):
            shutil.rmtree(tmp, ignore_errors=True)
            return out
        shutil.rmtree(out, ignore_errors=True)
    try:
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
