"""CrowdHuman odgt -> COCO: every field, ignore tags, boxes outside the image, broken lines."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from pgd_deploy.crowd_metrics import coco_crowd_records
from pgd_deploy.data.coco import load_coco
from pgd_deploy.data.odgt import odgt_to_coco, read_odgt


def _entry(tag, fbox, vbox=None, ignore=None):
    entry = {"tag": tag, "fbox": fbox, "vbox": vbox or fbox, "hbox": [0, 0, 1, 1]}
    if ignore is not None:
        entry["extra"] = {"ignore": ignore}
    return entry


RECORDS = [
    {
        "ID": "273271,c9db000d5146c15",
        "gtboxes": [
            _entry("person", [10, 20, 30, 60], vbox=[12, 22, 20, 30], ignore=0),
            _entry("person", [-15, 50, 40, 80], ignore=0),  # off the left and bottom edges
            _entry("mask", [70, 0, 30, 30]),  # ignore region by tag
            _entry("person", [40, 10, 10, 10], ignore=1),  # ignore region by extra.ignore
        ],
    },
    {"ID": "284193,faa9000f2678b5e", "gtboxes": []},
]


@pytest.fixture()
def crowd(tmp_path):
    images = tmp_path / "Images"
    images.mkdir()
    Image.new("RGB", (100, 120)).save(images / f"{RECORDS[0]['ID']}.jpg")
    Image.new("RGB", (64, 48)).save(images / f"{RECORDS[1]['ID']}.jpg")
    odgt = tmp_path / "annotation_train.odgt"
    odgt.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    return odgt, images


def test_records_are_read_line_by_line_skipping_blank_lines(crowd):
    odgt, _ = crowd
    assert read_odgt(odgt) == RECORDS


def test_full_body_boxes_are_clipped_and_ignore_tags_become_iscrowd(crowd, tmp_path):
    odgt, images = crowd
    out = tmp_path / "train.json"
    summary = odgt_to_coco(odgt, images, out)
    assert summary == {"images": 2, "objects": 2, "ignore": 2, "clipped": 1}
    coco = json.loads(out.read_text())
    assert coco["categories"] == [{"id": 1, "name": "person"}]
    assert [
        (i["id"], i["file_name"], i["width"], i["height"], i["crowd_id"]) for i in coco["images"]
    ] == [
        (1, f"{RECORDS[0]['ID']}.jpg", 100, 120, RECORDS[0]["ID"]),
        (2, f"{RECORDS[1]['ID']}.jpg", 64, 48, RECORDS[1]["ID"]),
    ]
    anns = coco["annotations"]
    assert [a["bbox"] for a in anns] == [
        [10, 20, 30, 60],
        [0, 50, 25, 70],  # x1 -15 -> 0, y2 130 -> 120
        [70, 0, 30, 30],
        [40, 10, 10, 10],
    ]
    assert [a["iscrowd"] for a in anns] == [0, 0, 1, 1]
    assert [a["id"] for a in anns] == [1, 2, 3, 4] and {a["image_id"] for a in anns} == {1}
    assert [a["area"] for a in anns] == [1800, 1750, 900, 100]
    loaded = load_coco(out, images)  # the training loader: ignore regions are not targets
    assert loaded.num_crowd == 2 and loaded.images[0].boxes.tolist() == [
        [10, 20, 40, 80],
        [0, 50, 25, 120],
    ]
    assert loaded.images[1].boxes.shape == (0, 4)


def test_the_visible_box_is_taken_on_request(crowd, tmp_path):
    odgt, images = crowd
    odgt_to_coco(odgt, images, tmp_path / "v.json", box_key="vbox")
    coco = json.loads((tmp_path / "v.json").read_text())
    assert coco["annotations"][0]["bbox"] == [12, 22, 20, 30]


def test_crowd_records_give_the_evaluation_its_ids_objects_and_ignore_regions(crowd, tmp_path):
    odgt, images = crowd
    odgt_to_coco(odgt, images, tmp_path / "c.json")
    coco = json.loads((tmp_path / "c.json").read_text())
    records = coco_crowd_records(coco)
    assert [r["ID"] for r in records] == [RECORDS[0]["ID"], RECORDS[1]["ID"]]
    assert [(r["width"], r["height"]) for r in records] == [(100, 120), (64, 48)]
    assert [b["tag"] for b in records[0]["gtboxes"]] == ["person", "person", "mask", "mask"]
    assert records[0]["gtboxes"][1]["fbox"] == [0, 50, 25, 70] and records[1]["gtboxes"] == []
    assert coco_crowd_records(coco, image_ids=[2]) == records[1:]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"odgt:2: invalid JSON"),
        ('["ID"]', r"odgt:2: expected a JSON object"),
        ('{"gtboxes": []}', r"odgt:2: field 'ID' must be a non-empty string"),
        ('{"ID": "b", "gtboxes": {}}', r"odgt:2: field 'gtboxes' must be a list"),
        ('{"ID": "b", "gtboxes": [{"fbox": [1, 2, 3, 4]}]}', r"odgt:2: gtboxes\[0\]: field 'tag'"),
        ('{"ID": "b", "gtboxes": [{"tag": "person"}]}', r"gtboxes\[0\]: field 'fbox' must be"),
        ('{"ID": "b", "gtboxes": [{"tag": "person", "fbox": [1, 2, 3]}]}', "'fbox' must be"),
        ('{"ID": "b", "gtboxes": [{"tag": "person", "fbox": [1, 2, 3, NaN]}]}', "finite"),
        (
            '{"ID": "b", "gtboxes": [{"tag": "person", "fbox": [1, 2, 3, 4], "extra": 1}]}',
            "'extra'",
        ),
        ('{"ID": "a", "gtboxes": []}', r"odgt:2: ID 'a' already appears on line 1"),
    ],
)
def test_a_malformed_line_is_refused_with_its_line_number_and_field(tmp_path, line, message):
    odgt = tmp_path / "bad.odgt"
    odgt.write_text('{"ID": "a", "gtboxes": []}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_odgt(odgt)


def test_missing_files_and_images_are_named(crowd, tmp_path):
    odgt, images = crowd
    with pytest.raises(ValueError, match="odgt file not found"):
        read_odgt(tmp_path / "none.odgt")
    (tmp_path / "empty.odgt").write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        read_odgt(tmp_path / "empty.odgt")
    with pytest.raises(ValueError, match="images folder not found"):
        odgt_to_coco(odgt, tmp_path / "nowhere", tmp_path / "x.json")
    (images / f"{RECORDS[1]['ID']}.jpg").unlink()
    with pytest.raises(ValueError, match=f"{RECORDS[1]['ID']}.jpg of odgt record .* not found"):
        odgt_to_coco(odgt, images, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()  # nothing half-written
    with pytest.raises(ValueError, match="box must be one of"):
        read_odgt(odgt, box_key="box")


def test_pgd_train_data_crowdhuman_writes_the_coco_file(crowd, tmp_path, capsys):
    from pgd_deploy.cli import train_main

    odgt, images = crowd
    out = tmp_path / "ann" / "val.json"
    args = ["data", "crowdhuman", "--odgt", str(odgt), "--images", str(images), "--out", str(out)]
    assert train_main([*args, "--box", "vbox"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "images": 2,
        "objects": 2,
        "ignore": 2,
        "clipped": 1,
    }
    assert json.loads(out.read_text())["annotations"][0]["bbox"] == [12, 22, 20, 30]
    (images / f"{RECORDS[0]['ID']}.jpg").unlink()
    assert train_main(args) != 0
    assert f"{RECORDS[0]['ID']}.jpg of odgt record" in capsys.readouterr().err


def test_crowd_evaluation_of_a_dataset_with_more_than_one_class_is_refused(tmp_path):
    from pgd_deploy.config import DataConfig
    from pgd_deploy.data.dataset import build_dataset

    (tmp_path / "val").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "val" / "a.jpg")
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 32, "height": 32}],
        "annotations": [],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}],
    }
    (tmp_path / "val.json").write_text(json.dumps(coco))
    cfg = DataConfig(root=str(tmp_path), val_images="val", val_ann="val.json")
    assert build_dataset(cfg, "val", train=False).coco.num_classes == 2
    crowd = DataConfig(root=str(tmp_path), val_images="val", val_ann="val.json", metric="crowd")
    with pytest.raises(ValueError, match=r"val.json: field 'categories' has 2 classes"):
        build_dataset(crowd, "val", train=False)
