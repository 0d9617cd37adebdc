"""Where the real test images live: coco128 (128 train + 128 val COCO images, YOLO labels).

Looked up in order: $PGD_COCO128 when set (then nothing else), else the documented layout,
`shared/data/coco128` beside the repository (`<repo>/../shared/data/coco128`). Tests that need
the images skip with `SKIP_REASON` when neither exists; the skip summary of conftest reports
them, and the strict mode of `.ci/run` fails the run.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "PGD_COCO128"
BESIDE_REPO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"
SKIP_REASON = (
    f"coco128 not found: set {ENV} to its folder, or place it at {BESIDE_REPO} "
    "(shared/data/coco128 beside the repository)"
)


def find_coco128() -> Path | None:
    """$PGD_COCO128 (when set) or the folder beside the repository, if it holds
    `images/val2017`; else None."""
    env = os.environ.get(ENV, "")
    candidate = Path(env) if env else BESIDE_REPO
    return candidate if (candidate / "images" / "val2017").is_dir() else None
