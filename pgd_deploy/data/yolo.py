"""YOLO-format folders (images/ + labels/ of `class cx cy w h`, normalised) -> COCO JSON."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pgd_deploy.io_utils import write_json

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def read_names(path: str | Path) -> list[str]:
    """Class names from a YAML `names:` entry (list or index map) or one name per line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: class-names file not found")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml") or "names:" in text:
        try:
            import yaml
        except ImportError:  # pragma: no cover - pyyaml ships with the train extra's deps
            raise ValueError(f"{path}: reading YAML needs pyyaml (pip install pyyaml)") from None
        data = yaml.safe_load(text)
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, dict):
            keys = sorted(names)
            if keys != list(range(len(keys))):
                raise ValueError(f"{path}: field 'names' must map 0..N-1 to names, got keys {keys}")
            return [str(names[k]) for k in keys]
        if isinstance(names, list):
            return [str(n) for n in names]
        raise ValueError(f"{path}: expected a 'names' list or mapping, got {type(names).__name__}")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path}: no class names found")
    return names


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, as the detector will see the image."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{path}: unreadable image ({err})") from None
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: exif_transpose swaps the sides
        w, h = h, w
    return w, h


def yolo_to_coco(
    images: str | Path, labels: str | Path, names: list[str] | str | Path, out: str | Path
) -> dict:
    """Write COCO JSON for a YOLO folder pair; return summary counts.

    Image ids follow the sorted file order (1-based; numeric stems such as COCO's keep their
    number as the id). Category ids are the YOLO class index + 1. A missing label file means an
    image without objects.

    Raises:
        ValueError: a malformed label line (file and line named) or a class index out of range.
    """
    images, labels = Path(images), Path(labels)
    if not images.is_dir():
        raise ValueError(f"{images}: images folder not found")
    class_names = names if isinstance(names, list) else read_names(names)
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{images}: no images found (looked for {sorted(IMAGE_SUFFIXES)})")
    numeric = all(p.stem.isdigit() for p in files) and len({int(p.stem) for p in files}) == len(
        files
    )
    coco_images, annotations = [], []
    for i, path in enumerate(files):
        image_id = int(path.stem) if numeric else i + 1
        w, h = image_size(path)
        coco_images.append({"id": image_id, "file_name": path.name, "width": w, "height": h})
        label_file = labels / f"{path.stem}.txt"
        if not label_file.is_file():
            continue
        for line_no, line in enumerate(label_file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                cls, cx, cy, bw, bh = int(parts[0]), *map(float, parts[1:5])
                if len(parts) != 5:
                    raise ValueError
            except (ValueError, IndexError):
                raise ValueError(
                    f"{label_file}:{line_no}: expected 'class cx cy w h', got {line.strip()!r}"
                ) from None
            if not 0 <= cls < len(class_names):
                raise ValueError(
                    f"{label_file}:{line_no}: class {cls} outside 0..{len(class_names) - 1}"
                )
            x1, y1 = (cx - bw / 2) * w, (cy - bh / 2) * h
            box = [round(x1, 3), round(y1, 3), round(bw * w, 3), round(bh * h, 3)]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cls + 1,
                    "bbox": box,
                    "area": round(box[2] * box[3], 3),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(class_names)]
    write_json(out, {"images": coco_images, "annotations": annotations, "categories": categories})
    summary = {
        "images": len(coco_images),
        "annotations": len(annotations),
        "classes": len(categories),
    }
    logger.info("wrote %s: %s", out, summary)
    return summary
