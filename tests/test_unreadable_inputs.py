"""Unreadable gate, calibration and QAT calibration images (issue 38, part 2): skipped and
reported with their reasons, replaced by the next readable ones, and a clear refusal naming how
many were needed when too few remain. Real files, real decoders."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pgd_deploy.config import DataConfig, ExportConfig, TrainJob, from_dict
from pgd_deploy.export.images import calibration_images, gate_images


def _folder(root: Path, good: int, bad: dict[str, bytes]) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
            root / f"{i + 1}.png"
        )
    for name, data in bad.items():
        (root / name).write_bytes(data)
    return root


BAD = {"0_corrupt.jpg": b"\xff\xd8\xff\xe0 not a jpeg", "0_empty.png": b""}


def test_unreadable_gate_and_calibration_images_are_skipped_reported_and_replaced(tmp_path, caplog):
    folder = _folder(tmp_path / "imgs", 10, BAD)
    caplog.set_level(logging.WARNING)
    gate = gate_images(ExportConfig(val=str(folder)), DataConfig(), 8)
    assert len(gate) == 8 and [p.name for p in gate.paths][:2] == ["1.png", "10.png"]
    assert sorted(Path(p).name for p, _ in gate.skipped) == ["0_corrupt.jpg", "0_empty.png"]
    assert "2 unreadable skipped: 0_corrupt.jpg, 0_empty.png" in gate.source  # in the manifest
    assert "--val" in caplog.text and "skipped 2 unreadable image(s)" in caplog.text
    assert "empty" in caplog.text and "corrupt" in caplog.text  # the reasons, as predict gives
    calib = calibration_images(ExportConfig(calib_data=str(folder)), DataConfig(), 10)
    assert len(calib) == 10 and "2 unreadable skipped" in calib.source
    assert sum(1 for _ in calib.batches((64, 64), 4)) == 3  # every image kept decodes


def test_too_few_readable_images_stop_the_export_and_say_how_many_were_needed(tmp_path):
    folder = _folder(tmp_path / "imgs", 3, BAD)
    with pytest.raises(
        ValueError,
        match=r"--val .*only 3 readable image\(s\), 8 needed; 2 unreadable, e\.g\. .*corrupt",
    ):
        gate_images(ExportConfig(val=str(folder)), DataConfig(), 64)
    assert len(gate_images(ExportConfig(val=str(folder)), DataConfig(), 3)) == 3  # asked for 3
    with pytest.raises(ValueError, match=r"--calib-data .*only 3 readable image\(s\), 16 needed"):
        calibration_images(ExportConfig(calib_data=str(folder)), DataConfig(), 512)


def _coco_root(root: Path, good: int, bad: dict[str, bytes]) -> Path:
    images = _folder(root / "train2017", good, bad)
    files = sorted(p.name for p in images.iterdir())
    coco = {
        "images": [
            {"id": i + 1, "file_name": name, "width": 48, "height": 40}
            for i, name in enumerate(files)
        ],
        "annotations": [
            {
                "id": i + 1,
                "image_id": i + 1,
                "category_id": 1,
                "bbox": [4, 4, 20, 20],
                "area": 400,
                "iscrowd": 0,
            }
            for i in range(len(files))
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(coco))
    return root


def test_a_coco_val_skips_an_unreadable_record_and_takes_the_next(tmp_path):
    root = _coco_root(tmp_path / "coco", 9, {"0_corrupt.jpg": BAD["0_corrupt.jpg"]})
    ann = root / "annotations" / "instances_train2017.json"
    gate = gate_images(
        ExportConfig(val=str(ann), val_images=str(root / "train2017")), DataConfig(), 8
    )
    assert len(gate) == 8 and 1 not in gate.image_ids  # the corrupt record, id 1, is not scored
    assert gate.image_ids == list(range(2, 10)) and gate.annotations is not None


def _qat_job(root: Path, calib: int) -> TrainJob:
    data = {"root": str(root), "min_size": 64, "max_size": 64, "workers": 0}
    return from_dict(TrainJob, {"data": data, "qat": {"calib_images": calib}})


def test_qat_calibration_skips_unreadable_training_images_and_names_the_real_reason(
    tmp_path, caplog
):
    pytest.importorskip("torch")
    from pgd_deploy.data.dataset import build_dataset
    from pgd_deploy.qat import calibration_indices

    root = _coco_root(tmp_path / "coco", 20, BAD)
    cfg = _qat_job(root, 16)
    dataset = build_dataset(cfg.data, "train", train=False)
    caplog.set_level(logging.WARNING)
    indices = calibration_indices(cfg, dataset)
    assert indices == list(range(2, 18))  # the two unreadable first files replaced by the next
    assert "skipped 2 unreadable training image(s)" in caplog.text and "0_empty.png" in caplog.text
    broken = _coco_root(tmp_path / "broken", 0, BAD)
    cfg = _qat_job(broken, 16)
    with pytest.raises(ValueError) as err:
        calibration_indices(cfg, build_dataset(cfg.data, "train", train=False))
    message = str(err.value)
    assert "data.train_images" in message and str(broken / "train2017") in message
    assert (
        "only 0 readable training image(s) of 2, 16 needed" in message
        and "0_corrupt.jpg" in message
    )
