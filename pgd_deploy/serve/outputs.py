"""The files a `pgd-serve predict` run writes, each safe to read at any moment.

`JsonArrayWriter` keeps a JSON array valid on disk after every append; `ImageSaver` draws and
writes annotated images on a background thread under names that cannot leave the output folder;
`RunOutputs` opens and closes a run's files together.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import json
import logging
import os
from collections import deque
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from pgd_deploy.io_utils import (
    WriteError,
    atomic_open,
    atomic_write_bytes,
    atomic_write_text,
    remove_stale_temp_files,
    safe_child,
    write_json,
)
from pgd_deploy.runtime.backends import Backend
from pgd_deploy.serve.batcher import LoadedItem
from pgd_deploy.serve.draw import draw_detections
from pgd_deploy.serve.sources import SourceItem
from pgd_deploy.structures import Detections

logger = logging.getLogger(__name__)

RESULTS_NAME = "predictions.json"
FAILURES_NAME = "failures.json"
SUMMARY_NAME = "summary.json"
METRICS_NAME = "metrics.json"
IMAGES_DIR = "images"
IMAGES_MARKER = ".pgd-serve-images"  # beside IMAGES_DIR: its images were written by a run


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of `data` at `offset`, across short writes.

    Raises:
        OSError: ENOSPC when the disk takes no more bytes, or the write's own error.
    """
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written == 0:
            raise OSError(errno.ENOSPC, "short write")
        view, offset = view[written:], offset + written


class JsonArrayWriter:
    """A JSON array on disk that is complete and valid after every `extend`, and after a write
    that failed (a full disk).

    The file always ends with the closing bracket. Each `extend` is one positioned write that
    replaces that bracket with the new entries and a new bracket, so what is there is never
    rewritten. A write that fails (ENOSPC, short) is undone: the file is cut back to the entries
    before it and its bracket is put back in place (in bytes the file already held, so this needs
    no free space), then `io_utils.WriteError` names the file and the free space.
    """

    TAIL = b"\n]\n"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        atomic_write_bytes(self.path, b"[" + self.TAIL)  # replaces a previous file whole
        try:
            self._fd = os.open(self.path, os.O_WRONLY)
        except OSError as err:
            raise WriteError(self.path, err) from err
        self._end = 1  # byte offset just after "[" (then after the last entry)
        self.count = 0

    def _write_at(self, offset: int, data: bytes) -> None:
        _pwrite_all(self._fd, data, offset)

    def extend(self, entries: Sequence[dict[str, Any]]) -> None:
        if not entries:
            return
        body = ",\n".join(json.dumps(e, separators=(",", ":")) for e in entries)
        data = ((",\n" if self.count else "\n") + body).encode("utf-8")
        try:
            self._write_at(self._end, data + self.TAIL)
        except OSError as err:
            self._undo()
            raise WriteError(self.path, err) from err
        self._end += len(data)
        self.count += len(entries)

    def _undo(self) -> None:
        """Back to the entries written before the failed write (module docstring)."""
        try:
            os.ftruncate(self._fd, self._end + len(self.TAIL))
            self._write_at(self._end, self.TAIL)
        except OSError as err:
            logger.error("%s: could not restore the file after a failed write: %s", self.path, err)

    def close(self) -> None:
        """fsync and close (once)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        except OSError as err:
            raise WriteError(self.path, err) from err
        finally:
            os.close(fd)


class SummaryFile:
    """summary.json, whose room on disk is taken when the run starts (the JSON padded with
    spaces to `ROOM` bytes), so that a run stopped by a full disk can still say why: `record`
    then overwrites those bytes in place, which needs no free space. `write` replaces the file
    atomically at the normal end of a run."""

    ROOM = 16 * 1024

    def __init__(self, path: str | Path, first: dict[str, Any]) -> None:
        self.path = Path(path)
        atomic_write_bytes(self.path, self._padded(first) or b"")

    def _padded(self, obj: dict[str, Any]) -> bytes | None:
        data = json.dumps(obj, indent=2).encode("utf-8")
        return data + b" " * (self.ROOM - len(data) - 1) + b"\n" if len(data) < self.ROOM else None

    def write(self, obj: dict[str, Any]) -> None:
        write_json(self.path, obj)

    def record(self, obj: dict[str, Any]) -> None:
        """Overwrite the reserved bytes with `obj` (the failure path; `write` when it is too big
        or the reservation is gone)."""
        data = self._padded(obj)
        if data is None or not self.path.is_file() or self.path.stat().st_size != self.ROOM:
            self.write(obj)
            return
        fd = os.open(self.path, os.O_WRONLY)
        try:
            _pwrite_all(fd, data, 0)
            os.fsync(fd)
        except OSError as err:
            raise WriteError(self.path, err) from err
        finally:
            os.close(fd)


def image_output_path(root: Path, item: SourceItem, used: set[str]) -> Path:
    """Where the annotated copy of `item` goes in `root` (see `ImageSaver`); `used` holds the
    names given so far in the run, and gets this one."""
    parts = [
        p for p in PurePosixPath(item.name.replace("\\", "/")).parts if p not in ("..", ".", "/")
    ]
    stem = PurePosixPath("__".join(parts) or f"image_{item.index}").stem
    path = safe_child(root, f"{stem}.jpg")
    if path.name in used:
        path = safe_child(root, f"{path.stem}_{item.index}.jpg")
    used.add(path.name)
    return path


def save_drawn(path: Path, image: Any, dets: Detections, class_names: Sequence[str]) -> None:
    """`image` with `dets` drawn, as a JPEG at `path` (atomically: a full disk leaves no
    truncated JPEG under the name)."""
    drawn = draw_detections(image, dets, class_names)
    with atomic_open(path) as fh:
        drawn.save(fh, format="JPEG", quality=90)


class ImageSaver:
    """Draws and writes annotated images on a background thread (bounded backlog).

    File names come from the inputs' names with folders flattened and unsafe characters
    replaced (`io_utils.safe_child`); a clash gets the input index appended, so nothing is
    written outside `root` and no output overwrites another.
    """

    def __init__(
        self, root: Path, class_names: Sequence[str], *, min_score: float, backlog: int = 16
    ) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.class_names = list(class_names)
        self.min_score = min_score
        self.backlog = backlog
        self.used: set[str] = set()
        self.errors = 0
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="pgd-save")
        self._pending: deque[cf.Future] = deque()

    def output_path(self, item: SourceItem) -> Path:
        return image_output_path(self.root, item, self.used)

    def submit(self, loaded: LoadedItem, dets: Detections) -> None:
        path = self.output_path(loaded.item)
        self._pending.append(self._pool.submit(self._write, loaded.image, dets, path))
        while len(self._pending) > self.backlog:
            self._collect(self._pending.popleft())

    def _write(self, image: Any, dets: Detections, path: Path) -> None:
        save_drawn(path, image, dets.filter(self.min_score), self.class_names)

    def _collect(self, future: cf.Future) -> None:
        try:
            future.result()
        except OSError as err:
            self.errors += 1
            logger.warning("could not write an annotated image: %s", err)

    def close(self) -> None:
        while self._pending:
            self._collect(self._pending.popleft())
        self._pool.shutdown(wait=True)


def _remove_previous_images(out_dir: Path) -> int:
    """Delete the annotated images a previous run wrote (only when `out_dir` carries the marker:
    an images folder pgd-serve did not write is never touched); returns how many."""
    marker, folder = out_dir / IMAGES_MARKER, out_dir / IMAGES_DIR
    if not marker.is_file():
        return 0
    old = [p for p in folder.iterdir() if p.is_file() or p.is_symlink()] if folder.is_dir() else []
    for path in old:
        path.unlink()
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    marker.unlink()
    return len(old)


def prepare_images_dir(out_dir: Path, *, save_images: bool) -> None:
    """Leave no annotated image of a previous run in `out_dir/images`; with `save_images`,
    claim that folder for this run's images (a marker beside it records that pgd-serve wrote
    them, so that the next run may replace them).

    Raises:
        ValueError: `save_images` and `out_dir/images` holds files that pgd-serve did not write,
            which this run would mix with its own; nothing has been written then.
    """
    folder = out_dir / IMAGES_DIR
    ours = (out_dir / IMAGES_MARKER).is_file()
    if save_images and not ours and folder.is_dir() and any(folder.iterdir()):
        raise ValueError(
            f"{folder} holds files that pgd-serve predict did not write; choose another --out "
            "(or empty that folder) to save annotated images"
        )
    removed = _remove_previous_images(out_dir)
    if removed:
        logger.info("removed %d annotated image(s) of the previous run in %s", removed, folder)
    if save_images:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            out_dir / IMAGES_MARKER,
            f"{IMAGES_DIR}/ holds annotated images written by pgd-serve predict; the next run "
            "into this folder replaces them.\n",
        )


class RunOutputs:
    """The files of one run, opened together and always closed together.

    A previous run's outputs in `out_dir` are replaced, never mixed with this run's: its
    annotated images are removed, and its summary and metrics until this run writes its own
    (`SummaryFile`). Temporary files that a killed run left are removed, and logged.
    """

    def __init__(
        self, out_dir: Path, backend: Backend, save_images: bool, draw_score: float
    ) -> None:
        for folder in (out_dir, out_dir / IMAGES_DIR):  # a killed run's temporary files
            for leftover in remove_stale_temp_files(folder):
                logger.info("removed %s, left by a run that was killed", leftover)
        prepare_images_dir(out_dir, save_images=save_images)
        for name in (SUMMARY_NAME, METRICS_NAME):
            (out_dir / name).unlink(missing_ok=True)
        self.results = JsonArrayWriter(out_dir / RESULTS_NAME)
        self.failures = JsonArrayWriter(out_dir / FAILURES_NAME)
        self.saver = (
            ImageSaver(out_dir / IMAGES_DIR, backend.class_names, min_score=draw_score)
            if save_images
            else None
        )

    def add_failures(self, failed: Sequence[LoadedItem]) -> None:
        self.failures.extend(
            [
                {
                    "index": f.item.index,
                    "path": str(f.item.path),
                    "image_id": f.item.image_id,
                    "error": f.error,
                }
                for f in failed
            ]
        )
        for f in failed:
            logger.warning("skipped: %s", f.error)

    def close(self) -> int:
        """Close every file (all of them, even when one fails); returns the images that could
        not be saved.

        Raises:
            WriteError: predictions.json or failures.json could not be synced.
        """
        errors = 0
        try:
            if self.saver is not None:
                self.saver.close()
                errors = self.saver.errors
        finally:
            try:
                self.results.close()
            finally:
                self.failures.close()
        return errors
