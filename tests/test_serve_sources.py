"""Tests of pgd_deploy.serve.sources: folder, glob, list and COCO JSON inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pgd_deploy.serve.sources import resolve_source


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    return path


def test_folder_lists_every_visible_file_sorted(tmp_path: Path) -> None:
    _png(tmp_path / "b.png")
    _png(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image: still an input, reported when it fails")
    (tmp_path / ".hidden.png").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    src = resolve_source(tmp_path)
    assert src.kind == "dir"
    assert [it.name for it in src.items] == ["a.png", "b.png", "notes.txt"]
    assert [it.index for it in src.items] == [0, 1, 2]
    assert [it.image_id for it in src.items] == [1, 2, 3]


def test_links_and_pipes_are_inputs_never_silent_skips(tmp_path: Path, caplog) -> None:
    import os

    folder = tmp_path / "src"
    _png(folder / "a.png")
    (folder / "broken.jpg").symlink_to(folder / "gone.jpg")
    (folder / "loop_a.jpg").symlink_to(folder / "loop_b.jpg")
    (folder / "loop_b.jpg").symlink_to(folder / "loop_a.jpg")
    os.mkfifo(folder / "pipe.jpg")
    (folder / "sub").mkdir()
    names = ["a.png", "broken.jpg", "loop_a.jpg", "loop_b.jpg", "pipe.jpg"]
    with caplog.at_level("INFO", logger="pgd_deploy.serve.sources"):
        assert [it.name for it in resolve_source(folder).items] == names
    assert "1 sub-folder(s) not searched (e.g. sub)" in caplog.text
    assert [it.name for it in resolve_source(str(folder / "*.*")).items] == names


def test_numeric_stems_are_image_ids_and_others_follow(tmp_path: Path) -> None:
    for name in ("000000000139.jpg", "000000000285.jpg", "broken.jpg"):
        _png(tmp_path / name)
    ids = {it.name: it.image_id for it in resolve_source(tmp_path).items}
    assert ids == {"000000000139.jpg": 139, "000000000285.jpg": 285, "broken.jpg": 286}


def test_duplicate_numbers_fall_back_to_positions(tmp_path: Path) -> None:
    _png(tmp_path / "1.png")
    _png(tmp_path / "001.jpg")
    assert sorted(it.image_id for it in resolve_source(tmp_path).items) == [1, 2]


def test_a_file_listed_twice_keeps_its_number(tmp_path: Path) -> None:
    _png(tmp_path / "7.png")
    _png(tmp_path / "8.png")
    listing = tmp_path / "list.txt"
    listing.write_text("7.png\n8.png\n7.png\n")
    assert [it.image_id for it in resolve_source(listing).items] == [7, 8, 7]


def test_glob_recurses_and_names_are_relative(tmp_path: Path) -> None:
    _png(tmp_path / "x" / "a.png")
    _png(tmp_path / "y" / "a.png")
    (tmp_path / "y" / "skip.txt").write_text("x")
    src = resolve_source(str(tmp_path / "**" / "*.png"))
    assert src.kind == "glob"
    assert [it.name for it in src.items] == ["x/a.png", "y/a.png"]


def test_list_file_relative_to_itself_or_image_root(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "a.png")
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\n\nimgs/a.png\n  imgs/missing.png  \n")
    src = resolve_source(listing)
    assert src.kind == "list"
    assert [it.path for it in src.items] == [tmp_path / "imgs/a.png", tmp_path / "imgs/missing.png"]
    other = tmp_path / "elsewhere"
    other.mkdir()
    src = resolve_source(listing, image_root=other)
    assert src.items[0].path == other / "imgs/a.png"


def _coco(tmp_path: Path, files: list[str]) -> Path:
    data = {
        "images": [
            {"id": 10 + i, "file_name": f, "width": 8, "height": 8} for i, f in enumerate(files)
        ],
        "annotations": [],
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_json_keeps_its_image_ids(tmp_path: Path) -> None:
    _png(tmp_path / "images" / "a.png")
    ann = _coco(tmp_path, ["a.png", "b.png"])
    src = resolve_source(ann, image_root=tmp_path / "images")
    assert src.kind == "coco" and src.annotations is not None
    assert [(it.image_id, it.path.name) for it in src.items] == [(10, "a.png"), (11, "b.png")]


@pytest.mark.parametrize(
    "json_rel, image_dir",
    [
        ("ann.json", "."),
        ("annotations/val.json", "val"),  # pgd-train data shapes
        ("annotations/instances_val2017.json", "val2017"),  # COCO
        ("annotations/instances_val2017.json", "images/val2017"),  # coco128 / YOLO layout
    ],
)
def test_coco_json_finds_its_image_folder(tmp_path: Path, json_rel: str, image_dir: str) -> None:
    _png(tmp_path / image_dir / "a.png")
    ann = _coco(tmp_path, ["a.png"])
    (tmp_path / json_rel).parent.mkdir(parents=True, exist_ok=True)
    ann.rename(tmp_path / json_rel)
    (item,) = resolve_source(tmp_path / json_rel).items
    assert item.path == tmp_path / image_dir / "a.png"


def test_coco_json_with_wrong_root_names_the_fix(tmp_path: Path) -> None:
    ann = _coco(tmp_path, ["a.png"])
    with pytest.raises(ValueError, match="--image-root"):
        resolve_source(ann)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("missing_dir", "no such file, folder or glob match"),
        ("file.bin", "expected a folder, a glob pattern, a list file"),
        ("empty", "no input files found"),
        ("none/*.png", "no input files found"),
    ],
)
def test_bad_sources(tmp_path: Path, spec: str, message: str) -> None:
    (tmp_path / "file.bin").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=message):
        resolve_source(str(tmp_path / spec))


def test_missing_image_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--image-root .*folder not found"):
        resolve_source(tmp_path, image_root=tmp_path / "nope")


def test_uri_folders_objects_and_lists_are_opened_through_pyarrow(tmp_path: Path) -> None:
    """file:// URIs go through pyarrow.fs, the layer s3:// and gs:// sources use: a "folder"
    lists its visible objects (sorted, not recursing), an object is one input, a list file may
    mix URIs and paths, and a missing object is an input that fails when decoded, by name."""
    pytest.importorskip("pyarrow.fs")
    from pgd_deploy.runtime.preprocess import ImageDecodeError
    from pgd_deploy.serve.sources import load_source_image

    for name in ("2.png", "1.png", ".hidden.png", "sub/3.png"):
        _png(tmp_path / "imgs" / name)
    uri = (tmp_path / "imgs").as_uri()
    src = resolve_source(uri + "/")
    assert src.kind == "uri"
    assert [(it.path, it.name, it.image_id) for it in src.items] == [
        (f"{uri}/1.png", "1.png", 1),
        (f"{uri}/2.png", "2.png", 2),
    ]
    assert load_source_image(src.items[0].path, max_pixels=None).shape == (8, 8, 3)
    (one,) = resolve_source(f"{uri}/sub/3.png").items
    assert one.path == f"{uri}/sub/3.png" and one.image_id == 3
    listing = tmp_path / "list.txt"
    listing.write_text(f"{uri}/2.png\nimgs/1.png\n{uri}/gone.png\n")
    items = resolve_source(listing).items
    assert [it.path for it in items] == [f"{uri}/2.png", tmp_path / "imgs/1.png", f"{uri}/gone.png"]
    with pytest.raises(ImageDecodeError, match=f"{uri}/gone.png: no such object"):
        load_source_image(items[2].path, max_pixels=None)
    with pytest.raises(ValueError, match="no such object or folder"):
        resolve_source(f"{uri}/nothing/")
    with pytest.raises(ValueError, match="cannot open this URI"):
        resolve_source("nosuchscheme://bucket/key.jpg")
