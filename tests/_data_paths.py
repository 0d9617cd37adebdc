"""Where the real test images live: coco128 (128 train + 128 val COCO images, YOLO labels).

Looked up in order: $PGD_COCO128, `shared/data/coco128` beside the repository (the development
layout), then /work/shared/data/coco128. Tests that need it skip when none exists.
"""

from __future__ import annotations

import os
from pathlib import Path

_CANDIDATES = [
    os.environ.get("PGD_COCO128", ""),
    str(Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"),
    "/work/shared/data/coco128",
]


def find_coco128() -> Path | None:
    """The first candidate holding `images/val2017`, or None."""
    for candidate in filter(None, _CANDIDATES):
        if (Path(candidate) / "images" / "val2017").is_dir():
            return Path(candidate)
    return None
