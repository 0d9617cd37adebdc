"""`pgd-serve predict --eval` scores a model that detects: the AP of its training-time evaluation.

(test_serve_predict.py runs `--eval` on coco128 with a random model, whose AP is near zero.)
"""

from __future__ import annotations

import json

import pytest
from serve_helpers import export_onnx

from pgd_deploy.checkpoint import load_checkpoint
from pgd_deploy.serve.command import main


def test_predict_eval_reproduces_the_checkpoints_ap(trained_run, tmp_path, capsys) -> None:
    pytest.importorskip("pycocotools")
    model = export_onnx(trained_run["checkpoint"], tmp_path / "model.onnx", imgsz=64)
    recorded = load_checkpoint(trained_run["checkpoint"])["metrics"]
    assert recorded["AP50"] > 0.1  # the model detects: the comparison is not 0 == 0
    out = tmp_path / "out"
    argv = ["predict", "--model", str(model), "--source", str(trained_run["val_json"])]
    argv += ["--image-root", str(trained_run["val_images"]), "--out", str(out)]
    assert main([*argv, "--eval", "--batch", "4", "--no-progress"]) == 0
    assert "COCO bbox (16 images)" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    # ONNX Runtime with the serving pre/post-processing vs PyTorch at training time: the same
    # letterbox (64 px images at 64x64) and thresholds, fp32 -> the same AP to rounding
    for key in ("AP", "AP50", "AP75"):
        assert metrics[key] == pytest.approx(recorded[key], abs=1e-3), key
