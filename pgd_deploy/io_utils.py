"""Small torch-free file helpers: atomic writes and their leftovers, hashing, safe output paths.

Every file that train, export and serve write goes through `atomic_open` (a temporary file in
the same folder, flushed, fsynced, renamed over the target), so a crash or a full disk never
leaves a half-written file under the real name; a failed write raises `WriteError`, which names
the file and the free space left on its filesystem.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def format_bytes(count: float) -> str:
    """1536 -> "1.5 KiB"; under 1 KiB: "512 bytes"."""
    if count < 1024:
        return f"{int(count)} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        count /= 1024
        if count < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}"
    raise AssertionError("unreachable")


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the filesystem that holds `path` (its nearest existing folder), or None."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


class WriteError(OSError):
    """A write that failed, in words: "disk full while writing runs/x/last.pt: 0 bytes free".

    Attributes:
        path: the file that could not be written.
        free: free bytes left on its filesystem (None when unknown).
    """

    def __init__(self, path: str | Path, cause: BaseException) -> None:
        self.path = Path(path)
        self.free = free_bytes(self.path)
        code = getattr(cause, "errno", None)
        if code in _DISK_FULL or (code is None and self.free == 0):
            what = "disk full"
        else:
            what = f"could not write ({getattr(cause, 'strerror', None) or cause})"
        room = "free space unknown" if self.free is None else f"{format_bytes(self.free)} free"
        self.message = f"{what} while writing {self.path}: {room}"
        super().__init__(code, self.message)

    def __str__(self) -> str:
        return self.message


class _RecordingFile:
    """The handle `atomic_open` yields: the real file, remembering the OSError a write raised,
    for writers that replace it with their own (torch.save raises RuntimeError)."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._fh.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        try:
            self._fh.flush()
        except OSError as err:
            self.error = err
            raise

    def fileno(self) -> int:
        # Hidden on purpose: PIL writes straight to a file descriptor when it has one and
        # ignores a short write (a full disk), which would leave a truncated image; through
        # `write` a short write raises.
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def _temp_path(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.{pid}.tmp")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (another user's counts as running)."""
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
        if pid != os.getpid() and not pid_alive(pid):
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
    end; an exception (or a crash) inside the block leaves any previous `path` untouched and no
    temporary file behind.

    Raises:
        WriteError: a write, the fsync or the rename failed (also when the writer inside the
            block turned the OSError into its own exception); names `path` and the free space.
    """
    path = Path(path)
    tmp = _temp_path(path, os.getpid())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as raw:
            fh = _RecordingFile(raw)
            try:
                yield fh  # type: ignore[misc]
                raw.flush()
                os.fsync(raw.fileno())
            except Exception as err:
                cause = err if isinstance(err, OSError) else fh.error
                if cause is None or isinstance(err, WriteError):
                    raise
                raise WriteError(path, cause) from err
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as err:  # creating the folder or the file, closing it, renaming it
        raise WriteError(path, err) from err
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


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
