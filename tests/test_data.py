"""Data: synthetic shapes, COCO validation errors, YOLO conversion, transforms, sampler."""

from __future__ import annotations

import json
from math import inf, nan
from pathlib import Path

import numpy as np
import pytest

from pgd_deploy.data.coco import load_coco
from pgd_deploy.data.shapes import ShapesSpec, generate_shapes, render_image
from pgd_deploy.data.yolo import read_names, yolo_to_coco


def _coco(tmp_path: Path, **overrides) -> Path:
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
            {"id": 2, "file_name": "b.jpg", "width": 100, "height": 80},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 30], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 50, 40], "iscrowd": 1},
            {"id": 3, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 10], "iscrowd": 0},
        ],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
    }
    data.update(overrides)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_mapping_crowd_degenerate_and_empty_images(tmp_path):
    coco = load_coco(_coco(tmp_path))
    assert coco.category_ids == [3, 7] and coco.class_names == ["three", "seven"]
    first, second = coco.images
    assert first.boxes.tolist() == [[10, 10, 30, 40]] and first.labels.tolist() == [1]
    assert len(second.boxes) == 0  # images without annotations are kept
    assert coco.num_crowd == 1 and coco.num_degenerate == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"images": None}, "field 'images' must be a list"),
        ({"annotations": "x"}, "field 'annotations' must be a list"),
        (
            {"annotations": [{"id": 9, "image_id": 5, "category_id": 7, "bbox": [0, 0, 1, 1]}]},
            r"annotations\[0\] \(id 9\): field 'image_id' refers to unknown image 5",
        ),
        (
            {"annotations": [{"id": 9, "image_id": 1, "category_id": 4, "bbox": [0, 0, 1, 1]}]},
            r"annotations\[0\] \(id 9\): field 'category_id' refers to unknown category 4",
        ),
        (
            {"annotations": [{"id": 9, "image_id": 1, "category_id": 7, "bbox": [0, 0, 1]}]},
            "field 'bbox' must be",
        ),
        (  # NaN used to be dropped silently and Infinity stretched to the image edge
            {"annotations": [{"id": 9, "image_id": 1, "category_id": 7, "bbox": [nan, 0, 1, 1]}]},
            r"annotations\[0\] \(id 9\): field 'bbox' must hold finite numbers, got \[nan",
        ),
        (
            {"annotations": [{"id": 4, "image_id": 1, "category_id": 7, "bbox": [0, 0, inf, 1]}]},
            r"annotations\[0\] \(id 4\): field 'bbox' must hold finite numbers, got .*inf",
        ),
    ],
)
def test_coco_errors_name_file_and_field(tmp_path, overrides, message):
    path = _coco(tmp_path, **overrides)
    with pytest.raises(ValueError, match=message) as err:
        load_coco(path)
    assert str(path) in str(err.value)


def test_coco_missing_fields_files_and_bad_json(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"annotations": [], "categories": [{"id": 1}]}))
    with pytest.raises(ValueError, match="missing field 'images'"):
        load_coco(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_coco(path)
    with pytest.raises(ValueError, match="annotation file not found"):
        load_coco(tmp_path / "none.json")
    (tmp_path / "imgs").mkdir()
    with pytest.raises(ValueError, match=r"2 image\(s\) .* missing .*'a.jpg'"):
        load_coco(_coco(tmp_path), image_dir=tmp_path / "imgs")


def test_shapes_are_deterministic_and_extendable(tmp_path):
    a = generate_shapes(tmp_path / "a", train=3, val=2, seed=5, spec=ShapesSpec(size=64))
    b = generate_shapes(tmp_path / "b", train=5, val=2, seed=5, spec=ShapesSpec(size=64))
    for i in range(3):  # a larger set extends a smaller one image by image
        assert (a / "train" / f"{i:06d}.jpg").read_bytes() == (
            b / "train" / f"{i:06d}.jpg"
        ).read_bytes()
    img0, objs0 = render_image(5, "train", 0, ShapesSpec(size=64))
    img1, objs1 = render_image(6, "train", 0, ShapesSpec(size=64))
    assert not np.array_equal(np.asarray(img0), np.asarray(img1))
    coco = load_coco(a / "annotations" / "train.json", image_dir=a / "train")
    assert coco.class_names == ["circle", "square", "triangle"]
    for rec in coco.images:
        assert (rec.boxes[:, :2] >= -1).all() and (rec.boxes[:, 2:] <= 65).all()
        assert (rec.boxes[:, 2:] > rec.boxes[:, :2]).all()


def test_names_from_yaml_and_text(tmp_path, coco128):
    names = read_names(coco128 / "config.yaml")
    assert len(names) == 80 and names[0] == "person" and names[79] == "toothbrush"
    txt = tmp_path / "names.txt"
    txt.write_text("cat\ndog\n\n")
    assert read_names(txt) == ["cat", "dog"]
    yml = tmp_path / "n.yaml"
    yml.write_text("names: [a, b]\n")
    assert read_names(yml) == ["a", "b"]


def test_yolo_conversion_uses_real_sizes(tmp_path, coco128):
    out = tmp_path / "val.json"
    summary = yolo_to_coco(
        coco128 / "images/val2017", coco128 / "labels/val2017", coco128 / "config.yaml", out
    )
    assert summary == {"images": 128, "annotations": 898, "classes": 80}
    coco = load_coco(out, image_dir=coco128 / "images/val2017")
    from PIL import Image

    rec = coco.images[0]
    with Image.open(coco128 / "images/val2017" / rec.file_name) as img:
        assert (rec.width, rec.height) == img.size
    assert rec.image_id == int(Path(rec.file_name).stem)  # COCO ids are kept


def test_yolo_malformed_label_names_file_and_line(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    img, _ = render_image(0, "train", 0, ShapesSpec(size=32))
    img.save(tmp_path / "images" / "x.jpg")
    (tmp_path / "labels" / "x.txt").write_text("0 0.5 0.5 0.2 0.2\n1 0.5 oops 0.1 0.1\n")
    with pytest.raises(ValueError, match=r"x\.txt:2: expected 'class cx cy w h'"):
        yolo_to_coco(tmp_path / "images", tmp_path / "labels", ["a", "b"], tmp_path / "o.json")
    (tmp_path / "labels" / "x.txt").write_text("5 0.5 0.5 0.2 0.2\n")
    with pytest.raises(ValueError, match=r"x\.txt:1: class 5 outside 0..1"):
        yolo_to_coco(tmp_path / "images", tmp_path / "labels", ["a", "b"], tmp_path / "o.json")


def test_min_box_size_and_annotated_follow_mmdetection(tmp_path):
    # mmdetection's training set: boxes under 1 px dropped; images with no annotation at all
    # dropped, but an image whose only annotation is a crowd box is kept (it has one).
    path = _coco(
        tmp_path,
        images=[{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 80} for i in (1, 2, 3)],
        annotations=[
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 30], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [50, 10, 0.5, 30], "iscrowd": 0},
            {"id": 3, "image_id": 3, "category_id": 3, "bbox": [0, 0, 50, 40], "iscrowd": 1},
        ],
    )
    assert len(load_coco(path).images[0].boxes) == 2  # default: every box of positive size
    coco = load_coco(path, min_box_size=1.0)
    assert coco.images[0].boxes.tolist() == [[10, 10, 30, 40]] and coco.num_degenerate == 1
    assert [r.image_id for r in coco.images] == [1, 2, 3]  # kept by default
    assert [r.image_id for r in coco.annotated().images] == [1, 3]


def test_data_filter_empty_and_min_box_size_apply_to_training_only(tmp_path):
    from pgd_deploy.config import DataConfig
    from pgd_deploy.data.dataset import build_dataset

    root = generate_shapes(tmp_path / "s", train=4, val=2, seed=0, spec=ShapesSpec(size=64))
    for split in ("train", "val"):
        ann = root / "annotations" / f"{split}.json"
        data = json.loads(ann.read_text())
        first = data["images"][0]["id"]
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] != first]
        extra = {"id": 10**6, "image_id": data["images"][1]["id"], "category_id": 1}
        data["annotations"].append({**extra, "bbox": [5, 5, 0.5, 9], "iscrowd": 0})
        ann.write_text(json.dumps(data))
    kw = dict(root=str(root), train_images="train", val_images="val", workers=0)
    kw.update(train_ann="annotations/train.json", val_ann="annotations/val.json")
    plain = DataConfig(**kw)
    official = DataConfig(**kw, filter_empty=True, min_box_size=1.0)
    train = build_dataset(plain, "train", train=True).coco
    assert len(train.images) == 4
    tiny = lambda coco: sum(((r.boxes[:, 2] - r.boxes[:, 0]) < 1).sum() for r in coco.images)
    assert tiny(train) == 1
    train = build_dataset(official, "train", train=True).coco
    assert len(train.images) == 3 and tiny(train) == 0
    val = build_dataset(official, "val", train=False).coco
    assert len(val.images) == 2 and tiny(val) == 1  # evaluation data untouched
