"""Where gate and calibration images come from, letterboxed exactly as in serving.

Gate images (`--gate-images N`): from `--val` when given (a COCO JSON or a dataset root, which also
enables the mAP gate, or a plain folder of images), else the checkpoint's own validation split
with its labels when they are here (its data config's `val_ann` and `val_images`, or the
synthetic shapes rendered in memory with their boxes), which turns the mAP gate on by default
(`export.own_val_labels = false`: the same images without labels), else its validation images
without labels, else the built-in synthetic images. Calibration images
(`--calib-images N`, int8): from `export.calib_data` when given, else the checkpoint's training
images, else synthetic training images. Every choice is recorded in the manifest.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pgd_deploy.config import DataConfig, ExportConfig
from pgd_deploy.runtime.preprocess import ImageTransform, load_image, preprocess

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class ImageSet:
    """Images for the gates or calibration.

    Attributes:
        source: human-readable origin (recorded in the manifest).
        paths: image files (loaded lazily), or empty when `arrays` holds rendered images.
        arrays: uint8 RGB [H, W, 3] images already in memory (synthetic).
        image_ids: COCO image id per image (when annotations are known).
        annotations: the parsed COCO dict (enables the mAP gate), or None.
    """

    source: str
    paths: list[Path] = field(default_factory=list)
    arrays: list[np.ndarray] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)
    annotations: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.paths) or len(self.arrays)

    def image(self, i: int) -> np.ndarray:
        return load_image(self.paths[i]) if self.paths else self.arrays[i]

    def batches(
        self, imgsz: Sequence[int], batch_size: int
    ) -> Iterator[tuple[np.ndarray, list[ImageTransform]]]:
        """Letterboxed float32 batches [b, 3, H, W] with their transforms."""
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            yield preprocess([self.image(i) for i in range(start, stop)], imgsz)


def _folder_images(folder: Path, count: int) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files[:count]


def _coco_set(ann: Path, image_dir: Path, count: int) -> ImageSet:
    from pgd_deploy.data.coco import load_coco

    coco = load_coco(ann, image_dir)
    records = coco.images[:count]
    return ImageSet(
        source=f"{ann} ({image_dir})",
        paths=[image_dir / r.file_name for r in records],
        image_ids=[r.image_id for r in records],
        annotations=coco.raw,
    )


def _json_image_dir(ann: Path, explicit: str) -> Path:
    if explicit:
        return Path(explicit)
    from pgd_deploy.data.coco import read_json

    images = read_json(ann).get("images") or [{}]
    first = images[0].get("file_name", "")
    for cand in (ann.parent, ann.parent.parent / "images", ann.parent.parent / ann.stem):
        if first and (cand / first).is_file():
            return cand
    raise ValueError(
        f"--val {ann}: cannot find its images (looked beside the JSON and in ../images); "
        "give the folder with --val-images"
    )


def _synthetic(data: DataConfig, split: str, count: int) -> ImageSet:
    from pgd_deploy.data.shapes import ShapesSpec, render_image

    spec = ShapesSpec(size=data.shapes_size)
    arrays = [
        np.asarray(render_image(data.shapes_seed, split, i, spec)[0].convert("RGB"))
        for i in range(count)
    ]
    return ImageSet(source=f"synthetic shapes ({split}, seed {data.shapes_seed})", arrays=arrays)


def _own_labelled_val(data: DataConfig, count: int) -> ImageSet | None:
    """The checkpoint's own validation split with its annotations (mAP gate), or None when its
    annotation file or images are not here."""
    if not data.root:
        from pgd_deploy.data.shapes import ShapesSpec, coco_split

        spec = ShapesSpec(size=data.shapes_size)
        rendered, coco = coco_split("val", min(count, data.shapes_val), data.shapes_seed, spec)
        return ImageSet(
            source=f"synthetic shapes (val, seed {data.shapes_seed}, with their labels)",
            arrays=[np.asarray(img.convert("RGB")) for img in rendered],
            image_ids=[r["id"] for r in coco["images"]],
            annotations=coco,
        )
    ann, folder = Path(data.root) / data.val_ann, Path(data.root) / data.val_images
    if ann.is_file() and folder.is_dir():
        logger.info("gating on the checkpoint's own validation split %s (mAP gate on)", ann)
        return _coco_set(ann, folder, count)
    return None


def _dataset_split(data: DataConfig, split: str, count: int) -> ImageSet | None:
    """The checkpoint's own images of `split`, label-free, or None when unavailable here."""
    if not data.root:
        return _synthetic(data, split, count)
    root = Path(data.root)
    folder = root / (data.train_images if split == "train" else data.val_images)
    if folder.is_dir():
        try:
            return ImageSet(source=str(folder), paths=_folder_images(folder, count))
        except ValueError:
            pass
    logger.warning("the checkpoint's %s images (%s) are not available here", split, folder)
    return None


def gate_images(cfg: ExportConfig, data: DataConfig, count: int) -> ImageSet:
    """Gate images (see the module docstring).

    Raises:
        ValueError: `--val` names something that is not a COCO JSON, a dataset root or an image
            folder (the message names the path and what was expected).
    """
    if count < 1:
        raise ValueError(f"--gate-images: expected at least 1 image, got {count}")
    if cfg.val:
        val = Path(cfg.val)
        if val.is_file() and val.suffix.lower() == ".json":
            return _coco_set(val, _json_image_dir(val, cfg.val_images), count)
        if val.is_dir():
            ann = val / data.val_ann
            if ann.is_file():
                return _coco_set(ann, val / data.val_images, count)
            return ImageSet(source=str(val), paths=_folder_images(val, count))
        raise ValueError(
            f"--val {val}: expected a COCO annotation JSON, a dataset root with {data.val_ann}, "
            "or a folder of images"
        )
    found = _own_labelled_val(data, count) if cfg.own_val_labels else None
    found = found if found is not None else _dataset_split(data, "val", count)
    return found if found is not None else _synthetic(data, "val", count)


def calibration_images(cfg: ExportConfig, data: DataConfig, count: int) -> ImageSet:
    """int8 calibration images (see the module docstring)."""
    if count < 1:
        raise ValueError(f"--calib-images: expected at least 1 image, got {count}")
    if cfg.calib_data:
        folder = Path(cfg.calib_data)
        if not folder.is_dir():
            raise ValueError(f"export.calib_data {folder}: expected a folder of training images")
        return ImageSet(source=str(folder), paths=_folder_images(folder, count))
    found = _dataset_split(data, "train", count)
    return found if found is not None else _synthetic(data, "train", count)
