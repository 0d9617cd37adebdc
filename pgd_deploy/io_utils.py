"""Small torch-free file helpers: atomic writes and their leftovers, hashing, safe output paths."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


def _temp_path(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.{pid}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete what a process that died mid-work (kill -9, power loss) left in `folder`: the
    temporary files of `atomic_open` and the folders of `scratch_folder`, both `.NAME.PID.tmp`,
    whose PID is no longer running.

    Returns:
        The removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        found = re.fullmatch(r"\.(.+)\.(\d+)\.tmp", path.name)
        if not found or path.is_symlink() or not (path.is_file() or path.is_dir()):
            continue
        pid = int(found.group(2))
        if pid != os.getpid() and not _pid_alive(pid):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextmanager
def scratch_folder(parent: str | Path, label: str) -> Iterator[Path]:
    """A scratch folder `.LABEL.PID.tmp` in `parent`, removed on exit. Kept beside the outputs
    (not in the system's temp folder) so that what a killed process leaves is found and removed
    by the next run into the same output (`remove_stale_temp_files`)."""
    path = Path(parent) / f".{label}.{os.getpid()}.tmp"
    shutil.rmtree(path, ignore_errors=True)  # this process's own, from an earlier call
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file handle whose content replaces `path` only if the block completes.

    Writes go to a temporary file beside `path`, which is fsynced and renamed over `path` at the
    end; an exception (or a crash) inside the block leaves any previous `path` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path, os.getpid())
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, then rename it over `path`."""
    with atomic_open(path) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_copy(source: str | Path, path: str | Path) -> Path:
    """Copy `source` to `path` through a temporary file beside `path` (`atomic_open`)."""
    with open(source, "rb") as src, atomic_open(path) as fh:
        shutil.copyfileobj(src, fh, 1 << 20)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    """Pretty JSON, written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def safe_child(root: str | Path, name: str) -> Path:
    """`root / name` reduced to a plain file name inside `root` (no traversal outside it)."""
    root = Path(root).resolve()
    base = Path(name).name or "unnamed"
    base = "".join(c if c.isalnum() or c in "._-" else "_" for c in base).lstrip(".") or "unnamed"
    out = (root / base).resolve()
    if out.parent != root:
        raise ValueError(f"refusing to write {name!r} outside {root}")
    return out
