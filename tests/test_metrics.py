"""COCO evaluation on real data: ground truth scores 1.0, noise scores lower, bad ids fail."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pgd_deploy.data.yolo import yolo_to_coco
from pgd_deploy.metrics import AP_KEYS, evaluate_coco, format_metrics


@pytest.fixture(scope="module")
def coco128_val(coco128, tmp_path_factory):
    out = tmp_path_factory.mktemp("ann") / "val.json"
    yolo_to_coco(
        coco128 / "images/val2017", coco128 / "labels/val2017", coco128 / "config.yaml", out
    )
    return out


def _gt_as_results(ann: dict, jitter: float = 0.0, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for a in ann["annotations"]:
        x, y, w, h = a["bbox"]
        if jitter:
            x, y = x + rng.normal(0, jitter) * w, y + rng.normal(0, jitter) * h
        out.append(
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": [x, y, w, h],
                "score": 0.9,
            }
        )
    return out


def test_ground_truth_scores_perfect_and_noise_scores_lower(coco128_val):
    ann = json.loads(coco128_val.read_text())
    perfect = evaluate_coco(coco128_val, _gt_as_results(ann))
    assert set(perfect) == set(AP_KEYS)
    assert perfect["AP"] == pytest.approx(1.0) and perfect["AP50"] == pytest.approx(1.0)
    noisy = evaluate_coco(ann, _gt_as_results(ann, jitter=0.15))
    assert 0.0 < noisy["AP"] < 0.9 and noisy["AP"] < noisy["AP50"]
    assert "AP50" in format_metrics(noisy)


def test_unknown_ids_are_errors(coco128_val):
    ann = json.loads(coco128_val.read_text())
    results = _gt_as_results(ann)[:3]
    results[0]["image_id"] = 999_999_999
    with pytest.raises(ValueError, match=r"'image_id' names 1 image\(s\) not in the annotations"):
        evaluate_coco(ann, results)
    results = _gt_as_results(ann)[:3]
    results[1]["category_id"] = 4242
    with pytest.raises(ValueError, match=r"unknown categories \[4242\]"):
        evaluate_coco(ann, results)


def test_empty_results_give_zero(coco128_val):
    assert evaluate_coco(coco128_val, [])["AP"] == 0.0


def test_cli_eval_predictions(coco128_val, tmp_path):
    ann = json.loads(coco128_val.read_text())
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps(_gt_as_results(ann)))
    out = tmp_path / "m.json"
    cmd = [
        sys.executable,
        "-m",
        "pgd_deploy.cli",
        "eval",
        "--predictions",
        str(preds),
        "--annotations",
        str(coco128_val),
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["AP"] == pytest.approx(1.0)
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}])
    )
    proc = subprocess.run(
        cmd[:5] + [str(bad)] + cmd[6:8], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "image_id" in proc.stderr
