"""Inputs of `pgd-serve predict`: a folder, a glob pattern, a list file or a COCO annotation JSON,
and URIs (`s3://bucket/prefix/`, `gs://...`, `file:///...`, or a list file of them) opened through
`pyarrow.fs`, the filesystem layer of Ray Data's readers (installed with the `[ray]` extra).

Every source resolves to an ordered list of `SourceItem`s with the image id written to the COCO
results. Files are not opened here: a missing, corrupt or non-image entry becomes a per-item
failure when it is decoded, so one bad file never stops a run.

Image ids: a COCO JSON gives its own; otherwise a numeric file stem (as in COCO's file names) is
the id, and other files are numbered after the largest such id (1, 2, ... when none is numeric).
For a folder of images that are all or none numerically named this is the numbering of
`pgd-train data from-yolo`, so results can be evaluated against its converted JSON.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import unquote, urlparse

import numpy as np

from pgd_deploy.data.coco import CocoAnnotations, load_coco

logger = logging.getLogger(__name__)

SourceKind = Literal["dir", "glob", "list", "coco", "uri"]
GLOB_CHARS = frozenset("*?[")
LIST_SUFFIXES = (".txt", ".lst")
URI_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
MAX_URI_BYTES = 512 * 1024 * 1024  # an object larger than this is refused, not read into memory


@dataclass(frozen=True)
class SourceItem:
    """One input of a run.

    Attributes:
        index: 0-based position in the run (results keep this order).
        path: the image file (it may not exist; decoding reports that), or its URI (a str).
        name: a short display name (the path relative to the source, or the list entry).
        image_id: COCO image id written to the results.
    """

    index: int
    path: Path | str
    name: str
    image_id: int


@dataclass
class Source:
    """A resolved source.

    Attributes:
        spec: the string the user gave.
        kind: "dir", "glob", "list", "coco" or "uri".
        items: the inputs, in run order.
        annotations: the parsed COCO JSON when `kind == "coco"` (for `--eval`), else None.
    """

    spec: str
    kind: SourceKind
    items: list[SourceItem]
    annotations: CocoAnnotations | None = None

    def __len__(self) -> int:
        return len(self.items)


def is_uri(text: str | os.PathLike) -> bool:
    """Whether `text` is a URI (`scheme://...`) rather than a local path."""
    return isinstance(text, str) and URI_PATTERN.match(text) is not None


def _stem(path: Path | str) -> str:
    return path.stem if isinstance(path, Path) else PurePosixPath(urlparse(path).path).stem


def _numbered(paths: list[Path | str], names: list[str]) -> list[SourceItem]:
    # Numeric stems keep their number (COCO file names); other files follow the largest number.
    ids: list[int | None] = [int(_stem(p)) if _stem(p).isdigit() else None for p in paths]
    files_of: dict[int, set[Path | str]] = {}
    for image_id, path in zip(ids, paths):
        if image_id is not None:
            files_of.setdefault(image_id, set()).add(path)
    if any(len(files) > 1 for files in files_of.values()):  # 1.jpg and 001.png: use positions
        ids = [None] * len(paths)
    next_id = max((i for i in ids if i is not None), default=0) + 1
    items = []
    for index, (path, name, image_id) in enumerate(zip(paths, names, ids)):
        if image_id is None:
            image_id, next_id = next_id, next_id + 1
        items.append(SourceItem(index, path, name, image_id))
    return items


def _from_dir(root: Path) -> list[SourceItem]:
    # Every visible entry but a folder is an input: anything that is not a readable image (a
    # text file, a broken symlink, a symlink loop, a FIFO) is reported as a failure when it is
    # decoded rather than silently ignored, so a run never quietly skips data.
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    folders = [p for p in entries if p.is_dir()]
    if folders:
        logger.info(
            "--source %s: %d sub-folder(s) not searched (e.g. %s); a glob such as '%s' "
            "includes them",
            root,
            len(folders),
            folders[0].name,
            root / "**" / "*",
        )
    paths = [p for p in entries if not p.is_dir()]
    return _numbered(paths, [p.name for p in paths])


def _from_glob(pattern: str) -> list[SourceItem]:
    # Matches that are not folders are inputs, broken links and FIFOs included (see _from_dir).
    paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if not Path(p).is_dir())
    if not paths:
        return []
    common = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return _numbered(paths, [p.relative_to(common).as_posix() for p in paths])


def _from_list(list_file: Path, image_root: Path | None) -> list[SourceItem]:
    base = image_root or list_file.parent
    paths: list[Path | str] = []
    names = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if is_uri(entry):  # opened through pyarrow.fs when decoded
            paths.append(entry)
        else:
            path = Path(entry).expanduser()
            paths.append(path if path.is_absolute() else base / path)
        names.append(entry)
    return _numbered(paths, names)


_FILESYSTEMS: dict[tuple[str, str], Any] = {}  # one client per scheme and bucket, per process


def _filesystem(uri: str) -> tuple[Any, str]:
    """The pyarrow filesystem of `uri` and the path within it (the client cached per process:
    an S3 client resolves its bucket's region once, not once per image)."""
    try:
        import pyarrow.fs as pafs
    except ImportError:
        raise ImportError(
            f"{uri}: URI sources need pyarrow: pip install 'pgd-deploy[ray]'"
        ) from None
    parsed = urlparse(uri)
    key = (parsed.scheme.lower(), parsed.netloc)
    cached = _FILESYSTEMS.get(key)
    if cached is not None:
        if cached.type_name == "local":
            return cached, unquote(parsed.path)
        if cached.type_name in ("s3", "gcs"):
            return cached, parsed.netloc + unquote(parsed.path)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as err:  # an unknown scheme, an unreachable object store
        raise ValueError(f"{uri}: cannot open this URI ({err})") from None
    _FILESYSTEMS[key] = fs
    return fs, path


def read_uri(uri: str) -> bytes:
    """The bytes of the object at `uri` (at most `MAX_URI_BYTES`).

    Raises:
        ImageDecodeError: missing, too large or unreadable, with the URI and the reason.
    """
    from pgd_deploy.runtime.preprocess import ImageDecodeError

    try:
        fs, path = _filesystem(uri)
        with fs.open_input_file(path) as fh:
            size = fh.size()
            if size > MAX_URI_BYTES:
                raise ImageDecodeError(
                    f"{uri}: {size} bytes exceeds the limit of {MAX_URI_BYTES} for one image"
                )
            return fh.read()
    except FileNotFoundError:
        raise ImageDecodeError(f"{uri}: no such object") from None
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ImageDecodeError(f"{uri}: could not be read ({err})") from None


def load_source_image(path: Path | str, *, max_pixels: int | None) -> np.ndarray:
    """Decode an input of a source, a local file or a URI (`runtime.preprocess.load_image`)."""
    from pgd_deploy.runtime.preprocess import load_image

    data = read_uri(path) if is_uri(path) else path
    return load_image(data, name=str(path), max_pixels=max_pixels)


def _from_uri(spec: str) -> list[SourceItem]:
    # A "folder" (a prefix) lists its visible objects, not recursing, as _from_dir; an object is
    # one input. Every object is an input: what is not an image is reported when decoded.
    import pyarrow.fs as pafs

    fs, root = _filesystem(spec)
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise ValueError(f"--source {spec}: no such object or folder")
        if info.type != pafs.FileType.Directory:
            return _numbered([spec], [info.base_name])
        listing = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    except OSError as err:
        raise ValueError(f"--source {spec}: cannot list it ({err})") from None
    names = sorted(
        i.base_name
        for i in listing
        if i.type == pafs.FileType.File and not i.base_name.startswith(".")
    )
    prefix = spec.rstrip("/") + "/"
    return _numbered([prefix + name for name in names], names)


def _coco_roots(json_path: Path) -> list[Path]:
    """Where a COCO JSON's images usually are: beside it, or in the split folder next to its
    `annotations/` folder (`annotations/instances_val2017.json` -> `val2017/`)."""
    parent, grand = json_path.parent, json_path.parent.parent
    split = json_path.stem.rsplit("_", 1)[-1]
    roots = [parent, grand / json_path.stem, grand / split, grand / "images" / split, grand]
    return list(dict.fromkeys(roots))


def _from_coco(
    json_path: Path, image_root: Path | None
) -> tuple[list[SourceItem], CocoAnnotations]:
    ann = load_coco(json_path)
    records = sorted(ann.images, key=lambda r: r.image_id)
    roots = [image_root] if image_root is not None else _coco_roots(json_path)
    probe = records[:50]
    root = next((r for r in roots if any((r / rec.file_name).is_file() for rec in probe)), None)
    if root is None and records:
        tried = ", ".join(str(r) for r in roots)
        raise ValueError(
            f"{json_path}: the images listed in field 'images' (e.g. {records[0].file_name}) "
            f"are not in {tried}; pass the image folder with --image-root"
        )
    if image_root is None:
        logger.info("%s: images found in %s", json_path, root)
    items = [
        SourceItem(i, root / r.file_name, r.file_name, r.image_id) for i, r in enumerate(records)
    ]
    return items, ann


def resolve_source(
    spec: str | os.PathLike, *, image_root: str | os.PathLike | None = None
) -> Source:
    """Resolve `spec` to the ordered inputs of a run.

    Args:
        spec: a folder (its visible files, sorted), a glob pattern (`**` recurses), a `.txt` list
            of image paths or URIs (one per line, `#` comments; relative paths are relative to the
            list or to `image_root`), a COCO annotation `.json` (images in `image_root`, else
            found beside the JSON or in the split folder next to its `annotations/` folder), or
            a URI of an object or a "folder" (`s3://bucket/prefix/`: its objects, sorted).
        image_root: base folder for relative paths of a list or COCO source.

    Raises:
        ValueError: the source does not exist, is empty or of an unknown kind; the message
            names the path and what was expected.
    """
    text = os.fspath(spec)
    root = Path(image_root) if image_root is not None else None
    if root is not None and not root.is_dir():
        raise ValueError(f"--image-root {root}: folder not found")
    path = Path(text).expanduser()
    annotations = None
    if is_uri(text):
        kind, items = "uri", _from_uri(text)
    elif path.is_dir():
        kind: SourceKind = "dir"
        items = _from_dir(path)
    elif any(c in text for c in GLOB_CHARS) and not path.exists():
        kind, items = "glob", _from_glob(text)
    elif not path.is_file():
        raise ValueError(f"--source {text}: no such file, folder or glob match")
    elif path.suffix.lower() == ".json":
        kind = "coco"
        items, annotations = _from_coco(path, root)
    elif path.suffix.lower() in LIST_SUFFIXES:
        kind, items = "list", _from_list(path, root)
    else:
        raise ValueError(
            f"--source {text}: expected a folder, a glob pattern, a list file "
            f"({', '.join(LIST_SUFFIXES)}) or a COCO annotation .json"
        )
    if not items:
        raise ValueError(f"--source {text}: no input files found ({kind})")
    logger.info("source %s: %d inputs (%s)", text, len(items), kind)
    return Source(text, kind, items, annotations)


def first_images(source: Source, count: int, max_pixels: int | None = None) -> list[np.ndarray]:
    """The first `count` decodable images of `source`, uint8 RGB (the serving gate's images);
    unreadable inputs are passed over here and reported by the run itself."""
    from pgd_deploy.runtime.preprocess import ImageDecodeError

    images: list[np.ndarray] = []
    for item in source.items:
        if len(images) >= count:
            break
        try:
            images.append(load_source_image(item.path, max_pixels=max_pixels))
        except ImageDecodeError:
            continue
    return images
