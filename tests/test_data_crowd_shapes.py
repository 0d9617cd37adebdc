"""The synthetic crowd: deterministic images, odgt annotations as CrowdHuman writes them, and the
COCO files the crowd metrics and the training loader read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pgd_deploy.crowd_metrics import clip_boxes
from pgd_deploy.data.crowd_shapes import (
    MIN_VISIBLE,
    ensure_crowd,
    generate_crowd,
    render_crowd_image,
)
from pgd_deploy.data.odgt import read_odgt


def test_an_image_depends_only_on_seed_split_and_index():
    first, entries = render_crowd_image(3, "train", 5)
    again, same = render_crowd_image(3, "train", 5)
    assert np.array_equal(np.asarray(first), np.asarray(again)) and entries == same
    other, _ = render_crowd_image(3, "val", 5)
    assert not np.array_equal(np.asarray(first), np.asarray(other))


def _entries(count=60):
    return [e for i in range(count) for e in render_crowd_image(0, "train", i)[1]]


def test_figures_overlap_leave_the_frame_and_some_are_ignored():
    entries = _entries()
    people = [e for e in entries if e["tag"] == "person"]
    masks = [e for e in entries if e["tag"] == "mask"]
    ignored = [e for e in people if e["extra"]["ignore"]]
    assert len(people) > 4 * 60 * 0.8 and 10 < len(masks) < 50 and 0 < len(ignored)
    outside = [e for e in people if e["fbox"][0] < 0 or e["fbox"][1] + e["fbox"][3] > 128]
    assert len(outside) > 20  # full bodies reaching out of the image, as in CrowdHuman
    for e in people:  # the visible box lies in the clipped full box (PIL fills x2: 2 px)
        x, y, w, h = e["fbox"]
        clipped = clip_boxes(np.array([[x, y, x + w, y + h]]), 128, 128)[0]
        vx, vy, vw, vh = e["vbox"]
        assert vx >= clipped[0] - 2 and vy >= clipped[1] - 2
        assert vx + vw <= clipped[2] + 2 and vy + vh <= clipped[3] + 2
    # heavy occlusion: some pair of kept figures of one image overlaps at IoU > 0.3
    assert any(_max_iou(render_crowd_image(0, "train", i)[1]) > 0.3 for i in range(20))


def _max_iou(entries):
    boxes = [e["fbox"] for e in entries if e["tag"] == "person"]
    best = 0.0
    for i, (ax, ay, aw, ah) in enumerate(boxes):
        for bx, by, bw, bh in boxes[i + 1 :]:
            iw = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
            ih = max(0.0, min(ay + ah, by + bh) - max(ay, by))
            best = max(best, iw * ih / (aw * ah + bw * bh - iw * ih))
    return best


def test_a_mostly_hidden_figure_is_marked_ignore():
    """The visible share decides: a figure whose vbox is small against its full box is ignored
    (the rule counts pixels; the boxes bound it)."""
    people = [e for e in _entries() if e["tag"] == "person"]
    for e in people:
        x, y, w, h = e["fbox"]
        inside = clip_boxes(np.array([[x, y, x + w, y + h]]), 128, 128)[0]
        area = (inside[2] - inside[0]) * (inside[3] - inside[1])
        if e["vbox"][2] * e["vbox"][3] < 0.5 * MIN_VISIBLE * area:
            assert e["extra"]["ignore"] == 1, e


def test_generate_writes_odgt_and_the_coco_files_beside_the_images(tmp_path):
    out = generate_crowd(tmp_path / "crowd", train=4, val=3, seed=1, size=96)
    records = read_odgt(out / "annotations" / "val.odgt")
    assert [r["ID"] for r in records] == ["val,000000", "val,000001", "val,000002"]
    assert all((out / "val" / f"{r['ID']}.jpg").is_file() for r in records)
    coco = json.loads((out / "annotations" / "val.json").read_text())
    assert coco["categories"] == [{"id": 1, "name": "person"}]
    assert [img["crowd_id"] for img in coco["images"]] == [r["ID"] for r in records]
    kinds = [a["iscrowd"] for a in coco["annotations"]]
    expected = [int(e["tag"] != "person" or bool(e["extra"]["ignore"])) for r in records
                for e in r["gtboxes"]]  # fmt: skip
    assert kinds == expected
    assert len(read_odgt(out / "annotations" / "train.odgt")) == 4


def test_ensure_crowd_generates_once_and_build_dataset_reads_it(tmp_path):
    from pgd_deploy.config import DataConfig
    from pgd_deploy.data.dataset import build_dataset

    first = ensure_crowd(tmp_path, train=2, val=2, seed=0, size=64)
    stamp = (first / "annotations" / "val.json").stat().st_mtime_ns
    assert ensure_crowd(tmp_path, train=2, val=2, seed=0, size=64) == first
    assert (first / "annotations" / "val.json").stat().st_mtime_ns == stamp
    cfg = DataConfig(cache_dir=str(tmp_path), shapes_crowd=True, shapes_train=2, shapes_val=2,
                     shapes_size=64, metric="crowd")  # fmt: skip
    val = build_dataset(cfg, "val", train=False)
    assert val.coco.class_names == ["person"] and val.coco.path.parent.parent == first


def test_pgd_train_data_shapes_crowd(tmp_path, capsys):
    from pgd_deploy.cli import train_main

    args = ["data", "shapes", "--crowd", "--out", str(tmp_path / "c"), "--train", "2"]
    assert train_main([*args, "--val", "1", "--size", "64"]) == 0
    assert "wrote 2 train + 1 val crowd images" in capsys.readouterr().out
    assert (tmp_path / "c" / "annotations" / "train.odgt").is_file()


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_record_converts_without_loss(tmp_path, split):
    out = generate_crowd(tmp_path, train=3, val=3, seed=2, size=64)
    records = read_odgt(out / "annotations" / f"{split}.odgt")
    coco = json.loads((out / "annotations" / f"{split}.json").read_text())
    assert len(coco["annotations"]) == sum(len(r["gtboxes"]) for r in records)
