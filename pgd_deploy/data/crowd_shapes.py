"""The built-in synthetic crowd: standing figures of one class, overlapping, with ignore regions.

A stand-in for CrowdHuman in tests and the crowd quickstart (numpy + PIL only). Each image holds
3-9 figures (a head on a body, about 0.4 as wide as tall) standing on a ground plane: the lower
a figure's feet, the nearer and larger it is, and it is drawn later, so nearer figures hide
farther ones; some stand partly outside the frame. Half of the images also hold a dense group
of small figures, which CrowdHuman would mark as a `mask` region nobody boxes one by one.

Annotations are written as CrowdHuman writes them, in odgt, and converted with
`odgt_to_coco` (so the crowd data path is the one real CrowdHuman takes):
- `fbox`: the whole figure, reaching outside the image where it stands there;
- `vbox`: the bounding box of its visible pixels;
- `extra.ignore = 1`: a figure less than `MIN_VISIBLE` visible (hidden behind others);
- a `mask` entry: the group of small figures.

Everything is deterministic from the seed: image i of a split depends only on
(seed, split, i). Layout written by `generate_crowd(out, ...)`:
    out/{train,val}/<ID>.jpg
    out/annotations/{train,val}.odgt and out/annotations/{train,val}.json (COCO, iscrowd regions)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pgd_deploy.data.odgt import odgt_to_coco
from pgd_deploy.data.shapes import ShapesSpec, background, ensure_generated
from pgd_deploy.io_utils import atomic_open, atomic_write_text

logger = logging.getLogger(__name__)

MIN_VISIBLE = 0.2  # a figure less visible than this is marked extra.ignore = 1
ASPECT = 0.4  # figure width / height
_SPLIT_ID = {"train": 11, "val": 12}  # streams apart from the shapes dataset's


def _figure(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], fill: Any) -> None:
    """A head disc over a rounded body filling `box` (x1, y1, x2, y2)."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    head = 0.17 * h
    cx = (x1 + x2) / 2
    draw.ellipse((cx - head / 2, y1, cx + head / 2, y1 + head), fill=fill)
    radius = max(1, int(0.25 * w))
    draw.rounded_rectangle((x1, y1 + 0.95 * head, x2, y2), radius=radius, fill=fill)


def _colour(rng: np.random.Generator, behind: np.ndarray) -> tuple[int, int, int]:
    colour = rng.uniform(0, 255, size=3)
    while np.abs(colour - behind).sum() < 150:  # keep each figure visible against the scene
        colour = rng.uniform(0, 255, size=3)
    return tuple(int(c) for c in colour)


def _group(img: Image.Image, rng: np.random.Generator, size: int) -> list[float]:
    """A dense group of small figures in the upper half; returns its region [x, y, w, h]."""
    w, h = rng.uniform(0.25, 0.45) * size, rng.uniform(0.12, 0.2) * size
    x, y = rng.uniform(0, size - w), rng.uniform(0.05 * size, 0.45 * size - h)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(10, 18))):
        fh = rng.uniform(0.5, 0.9) * h
        fx, fy = rng.uniform(x, x + w - ASPECT * fh), rng.uniform(y, y + h - fh)
        behind = np.asarray(img.getpixel((int(fx), int(fy))), dtype=float)
        _figure(draw, (fx, fy, fx + ASPECT * fh, fy + fh), _colour(rng, behind))
    return [round(x, 2), round(y, 2), round(w, 2), round(h, 2)]


def _layout(rng: np.random.Generator, size: int) -> list[tuple[float, float, float, float]]:
    """Figure boxes far to near (feet lower = nearer = larger), some outside the frame."""
    feet = np.sort(rng.uniform(0.45 * size, 1.15 * size, size=int(rng.integers(3, 10))))
    boxes = []
    for y2 in feet:
        h = (0.25 + 0.45 * (y2 / size - 0.45) / 0.7) * size * rng.uniform(0.85, 1.15)
        w = ASPECT * h
        x1 = rng.uniform(-0.3 * w, size - 0.7 * w)
        boxes.append((float(x1), float(y2 - h), float(x1 + w), float(y2)))
    return boxes


def render_crowd_image(
    seed: int, split: str, index: int, size: int = 128
) -> tuple[Image.Image, list[dict[str, Any]]]:
    """One synthetic crowd image and its odgt `gtboxes` (x, y, w, h)."""
    rng = np.random.default_rng([seed, _SPLIT_ID[split], index])
    img = background(rng, ShapesSpec(size=size, distractors=3))
    entries: list[dict[str, Any]] = []
    if rng.random() < 0.5:
        region = _group(img, rng, size)
        entries.append({"tag": "mask", "fbox": region, "vbox": region, "extra": {"ignore": 1}})
    labels = Image.new("I", (size, size), 0)  # which figure each pixel shows (0: none)
    draw, label_draw = ImageDraw.Draw(img), ImageDraw.Draw(labels)
    boxes = _layout(rng, size)
    for k, box in enumerate(boxes, start=1):
        cx, cy = (int(np.clip((box[0] + box[2]) / 2, 0, size - 1)),
                  int(np.clip((box[1] + box[3]) / 2, 0, size - 1)))  # fmt: skip
        behind = np.asarray(img.getpixel((cx, cy)), dtype=float)
        _figure(draw, box, _colour(rng, behind))
        _figure(label_draw, box, k)
    shown = np.asarray(labels)
    for k, (x1, y1, x2, y2) in enumerate(boxes, start=1):
        full = Image.new("1", (size, size), 0)
        _figure(ImageDraw.Draw(full), (x1, y1, x2, y2), 1)
        drawn = int(np.asarray(full).sum())  # the figure's pixels inside the frame
        ys, xs = np.nonzero(shown == k)
        if len(xs) == 0:
            continue  # entirely hidden: nobody would box it
        visible = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                   int(ys.max() - ys.min() + 1)]  # fmt: skip
        hidden = len(xs) < MIN_VISIBLE * max(drawn, 1)
        entries.append(
            {
                "tag": "person",
                "fbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "vbox": visible,
                "extra": {"ignore": int(hidden)},
            }
        )
    return img, entries


def generate_crowd(
    out: str | Path, *, train: int = 400, val: int = 100, seed: int = 0, size: int = 128
) -> Path:
    """Write the synthetic crowd under `out` (see the module docstring). Returns `out`."""
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("val", val)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(count):
            img, entries = render_crowd_image(seed, split, i, size)
            record_id = f"{split},{i:06d}"  # CrowdHuman's IDs hold a comma too
            with atomic_open(folder / f"{record_id}.jpg") as fh:
                img.save(fh, format="JPEG", quality=92)
            lines.append(json.dumps({"ID": record_id, "gtboxes": entries}))
        odgt = out / "annotations" / f"{split}.odgt"
        atomic_write_text(odgt, "\n".join(lines) + "\n")
        # written last, atomically: marks the split done
        odgt_to_coco(odgt, folder, out / "annotations" / f"{split}.json")
    logger.info("synthetic crowd: %d train + %d val images in %s", train, val, out)
    return out


def ensure_crowd(cache_dir: str | Path, *, train: int, val: int, seed: int, size: int) -> Path:
    """The synthetic crowd for these parameters, generated on first use into `cache_dir`."""
    key = f"crowd_s{size}_n{train}-{val}_seed{seed}_v1"  # v: bump when the drawing changes
    return ensure_generated(
        Path(cache_dir) / key,
        lambda tmp: generate_crowd(tmp, train=train, val=val, seed=seed, size=size),
    )
