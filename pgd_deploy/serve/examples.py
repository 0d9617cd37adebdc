"""The web demo's example images, kept in one private temporary folder (numpy and PIL only).

The demo server may serve files from this folder and from no other: it holds the built-in
synthetic images and decoded copies of the images of an `--examples` folder, never the folder
itself, so nothing else in it (sub-folders, credentials, non-images) can be fetched over HTTP.
The folder is deleted when the demo stops (and at interpreter exit at the latest); folders left
by a demo that was killed (kill -9) are deleted by the next demo start.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path

from PIL import Image

from pgd_deploy.io_utils import atomic_open, pid_alive, safe_child
from pgd_deploy.runtime.preprocess import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image

logger = logging.getLogger(__name__)

EXAMPLE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MAX_EXAMPLES = 24  # from an --examples folder
NUM_SYNTHETIC_EXAMPLES = 6
# Seed of the built-in examples: not the default dataset seed (0), so they never duplicate the
# validation images a user passes with --examples (e.g. `pgd-train data shapes` output).
SYNTHETIC_EXAMPLE_SEED = 1
FOLDER_PREFIX = "pgd-serve-examples-"  # + PID + "-" + random: the PID tells a stale folder


def synthetic_examples(folder: str | Path, count: int = NUM_SYNTHETIC_EXAMPLES) -> list[Path]:
    """Write `count` built-in synthetic images (never trained on) as PNG files."""
    from pgd_deploy.data.shapes import ShapesSpec, render_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image, _ = render_image(SYNTHETIC_EXAMPLE_SEED, "val", i, ShapesSpec())
        path = folder / f"shapes_val_{i:02d}.png"
        with atomic_open(path) as fh:
            image.save(fh, format="PNG")
        paths.append(path)
    return paths


def copy_folder_examples(
    folder: str | Path,
    dest: str | Path,
    *,
    limit: int = MAX_EXAMPLES,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> list[Path]:
    """Decode the images of an --examples folder (sorted, at most `limit`) and write them to
    `dest` as PNG; files that do not decode are skipped with a warning.

    Raises:
        ValueError: the folder does not exist or holds no readable image.
    """
    folder, dest = Path(folder), Path(dest)
    if not folder.is_dir():
        raise ValueError(f"--examples {folder}: folder not found")
    candidates = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in EXAMPLE_SUFFIXES and not p.name.startswith(".")
    )
    copies: list[Path] = []
    for path in candidates:
        if len(copies) == limit:
            break
        try:
            image = load_image(path, max_pixels=max_pixels)
        except ImageDecodeError as err:
            logger.warning("--examples: skipped %s", err)
            continue
        out = safe_child(dest, f"example_{len(copies):02d}_{path.stem}.png")
        with atomic_open(out) as fh:
            Image.fromarray(image).save(fh, format="PNG", compress_level=1)
        copies.append(out)
    if not copies:
        raise ValueError(f"--examples {folder}: no readable images ({', '.join(EXAMPLE_SUFFIXES)})")
    return copies


def remove_stale_folders(root: str | Path | None = None) -> list[Path]:
    """Delete this user's example folders (in `root`, default the temp dir) whose demo process
    no longer runs; returns them."""
    root = Path(root or tempfile.gettempdir())
    removed = []
    for path in root.glob(f"{FOLDER_PREFIX}*"):
        found = re.fullmatch(rf"{re.escape(FOLDER_PREFIX)}(\d+)-.+", path.name)
        try:
            mine = path.is_dir() and not path.is_symlink() and path.stat().st_uid == os.getuid()
        except OSError:
            continue
        if found and mine and not pid_alive(int(found.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class DemoExamples:
    """The demo's example images in their own temporary folder (see the module docstring).

    Attributes:
        folder: the only folder the demo server may serve files from.
        images: the example files in it: the synthetic ones, then the --examples copies.
        source: the --examples folder the copies were decoded from (None without one).
    """

    def __init__(
        self,
        examples_dir: str | Path | None = None,
        *,
        limit: int = MAX_EXAMPLES,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        for stale in remove_stale_folders():
            logger.info("removed %s, left by a demo that was killed", stale)
        self.source = Path(examples_dir) if examples_dir is not None else None
        self.folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-"))
        # Runs on close(), on garbage collection, or at interpreter exit, whichever comes first.
        self._remove = weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)
        try:
            self.images = synthetic_examples(self.folder)
            if examples_dir is not None:
                self.images += copy_folder_examples(
                    examples_dir, self.folder, limit=limit, max_pixels=max_pixels
                )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Delete the folder (idempotent)."""
        self._remove()

    def __enter__(self) -> DemoExamples:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
