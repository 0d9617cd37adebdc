"""Where gate and calibration images come from, letterboxed exactly as in serving.

Gate images (`--gate-images N`): from `--val` when given (a COCO JSON or a dataset root, which also
enables the mAP gate, or a plain folder of images), else the checkpoint's own validation split
with its labels when they are here (its data config's `val_ann` and `val_images`, or the
synthetic shapes rendered in memory with their boxes), which turns the mAP gate on by default
(`export.own_val_labels = false`: the same images without labels), else its validation images
without labels, else the built-in synthetic images. Calibration images
(`--calib-images N`, int8): from `export.calib_data` when given, else the checkpoint's training
images, else synthetic training images. Every choice is recorded in the manifest.

An unreadable file (corrupt, empty, truncated, not an image, too large) is skipped and reported
as predict reports it (the count, the first few paths and reasons, in the log and in the source
recorded in the manifest), and the next file of the folder or annotation file takes its place.
When too few readable images remain for the gate or the calibration to mean anything (fewer than
`MIN_GATE_IMAGES` / `MIN_CALIB_IMAGES`, or than asked for when that is less), the export stops
with the real reason and how many were needed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pgd_deploy.config import DataConfig, ExportConfig
from pgd_deploy.runtime.preprocess import ImageDecodeError, ImageTransform, load_image, preprocess

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MIN_GATE_IMAGES = 8  # fewer readable gate images than this (or than asked for) stop the export
MIN_CALIB_IMAGES = 16  # likewise for int8 calibration


@dataclass
class ImageSet:
    """Images for the gates or calibration.

    Attributes:
        source: human-readable origin (recorded in the manifest).
        paths: image files (loaded lazily), or empty when `arrays` holds rendered images.
        arrays: uint8 RGB [H, W, 3] images already in memory (synthetic).
        image_ids: COCO image id per image (when annotations are known).
        annotations: the parsed COCO dict (enables the mAP gate), or None.
        skipped: (path, reason) of each unreadable file passed over.
    """

    source: str
    paths: list[Path] = field(default_factory=list)
    arrays: list[np.ndarray] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)
    annotations: dict[str, Any] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

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


def _readable(
    candidates: Iterable[tuple[Path, int]], count: int
) -> tuple[list[Path], list[int], list[tuple[str, str]]]:
    """The first `count` candidates (path, image id) that decode, their ids, and the (path,
    reason) of each that does not (decoded once here: a bad file never reaches a gate)."""
    paths: list[Path] = []
    ids: list[int] = []
    skipped: list[tuple[str, str]] = []
    for path, image_id in candidates:
        if len(paths) >= count:
            break
        try:
            load_image(path)
        except ImageDecodeError as err:
            skipped.append((str(path), str(err)))
            continue
        paths.append(path)
        ids.append(image_id)
    return paths, ids, skipped


def _folder_set(folder: Path, count: int) -> ImageSet:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    paths, _, skipped = _readable(((p, i) for i, p in enumerate(files)), count)
    return ImageSet(source=str(folder), paths=paths, skipped=skipped)


def _coco_set(ann: Path, image_dir: Path, count: int) -> ImageSet:
    from pgd_deploy.data.coco import load_coco

    coco = load_coco(ann, image_dir)
    candidates = ((image_dir / r.file_name, r.image_id) for r in coco.images)
    paths, ids, skipped = _readable(candidates, count)
    return ImageSet(
        source=f"{ann} ({image_dir})",
        paths=paths,
        image_ids=ids,
        annotations=coco.raw,
        skipped=skipped,
    )


def _checked(images: ImageSet, count: int, minimum: int, what: str) -> ImageSet:
    """`images` with its unreadable files reported (the log and its recorded source).

    Raises:
        ValueError: fewer readable images than `min(count, minimum)`: the reason, the first
            unreadable files and how many were needed.
    """
    if not images.skipped:
        return images
    first = "; ".join(f"{path}: {reason}" for path, reason in images.skipped[:3])
    needed = min(count, minimum)
    if len(images) < needed:
        raise ValueError(
            f"{what} {images.source}: only {len(images)} readable image(s), {needed} needed; "
            f"{len(images.skipped)} unreadable, e.g. {first}"
        )
    logger.warning(
        "%s %s: skipped %d unreadable image(s), e.g. %s",
        what,
        images.source,
        len(images.skipped),
        first,
    )
    names = ", ".join(Path(path).name for path, _ in images.skipped[:3])
    more = ", ..." if len(images.skipped) > 3 else ""
    images.source += f" ({len(images.skipped)} unreadable skipped: {names}{more})"
    return images


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
            return _folder_set(folder, count)
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
            found = _coco_set(val, _json_image_dir(val, cfg.val_images), count)
        elif val.is_dir() and (val / data.val_ann).is_file():
            found = _coco_set(val / data.val_ann, val / data.val_images, count)
        elif val.is_dir():
            found = _folder_set(val, count)
        else:
            raise ValueError(
                f"--val {val}: expected a COCO annotation JSON, a dataset root with "
                f"{data.val_ann}, or a folder of images"
            )
        return _checked(found, count, MIN_GATE_IMAGES, "--val")
    found = _own_labelled_val(data, count) if cfg.own_val_labels else None
    found = found if found is not None else _dataset_split(data, "val", count)
    found = found if found is not None else _synthetic(data, "val", count)
    return _checked(found, count, MIN_GATE_IMAGES, "gate images")


def calibration_images(cfg: ExportConfig, data: DataConfig, count: int) -> ImageSet:
    """int8 calibration images (see the module docstring)."""
    if count < 1:
        raise ValueError(f"--calib-images: expected at least 1 image, got {count}")
    if cfg.calib_data:
        folder = Path(cfg.calib_data)
        if not folder.is_dir():
            raise ValueError(f"export.calib_data {folder}: expected a folder of training images")
        return _checked(_folder_set(folder, count), count, MIN_CALIB_IMAGES, "--calib-data")
    found = _dataset_split(data, "train", count)
    found = found if found is not None else _synthetic(data, "train", count)
    return _checked(found, count, MIN_CALIB_IMAGES, "calibration images")
