"""`parity.compare` (gate 1) and `gates.run_gates` on fake runtimes: statistics and verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from pgd_deploy.config import GatesConfig
from pgd_deploy.export.gates import EXIT_CODES, GateReport, GateResult, run_gates
from pgd_deploy.export.images import ImageSet
from pgd_deploy.export.parity import compare
from pgd_deploy.runtime.backends import Backend

N, C = 40, 3


class FakeBackend(Backend):
    """A deterministic 'model': boxes/scores derived from the image mean, plus an offset."""

    def __init__(self, box_offset=0.0, score_offset=0.0, nan=False):
        super().__init__({"imgsz": [32, 32], "class_names": ["a", "b", "c"]})
        self.box_offset, self.score_offset, self.nan = box_offset, score_offset, nan

    def infer(self, images):
        b = len(images)
        base = images.reshape(b, -1).mean(axis=1)[:, None, None]
        grid = np.arange(N, dtype=np.float32)[None, :, None]
        x = (grid % 8) * 4
        y = (grid // 8) * 4
        boxes = np.concatenate([x, y, x + 12, y + 12], axis=-1) + base + self.box_offset
        scores = np.clip(0.05 + 0.9 * ((grid * 7 + np.arange(C)) % 11) / 11 + 0 * base, 0, 1)
        scores = np.broadcast_to(scores, (b, N, C)) + self.score_offset
        if self.nan:
            scores = scores.copy()
            scores[0, 0, 0] = np.nan
        return {"boxes": boxes.astype(np.float32), "scores": scores.astype(np.float32)}


def _batches(n=3):
    rng = np.random.default_rng(0)
    return [rng.normal(size=(2, 3, 32, 32)).astype(np.float32) for _ in range(n)]


def test_identical_models_have_zero_error_and_pass():
    report = compare(FakeBackend(), FakeBackend(), _batches(), atol={"boxes": 0.0, "scores": 0.0})
    assert report.images == 6 and report.passed
    assert report.outputs["boxes"].max_abs == 0.0 and report.outputs["boxes"].shape == [-1, N, 4]


def test_elementwise_statistics_and_verdict():
    report = compare(FakeBackend(), FakeBackend(box_offset=2e-3), _batches(), atol=1e-3)
    boxes = report.outputs["boxes"]
    assert boxes.max_abs == pytest.approx(2e-3, rel=1e-2)
    assert boxes.mean_abs == pytest.approx(2e-3, rel=1e-2)
    assert boxes.p99_abs == pytest.approx(2e-3, rel=1e-2)
    assert boxes.passed is False and report.outputs["scores"].passed is True
    assert report.passed is False


def test_mean_statistic_passes_on_absolute_or_normalised_error():
    # boxes are ~20 px: 0.05 px absolute is above atol 1e-2 but only ~0.25% relative error
    report = compare(
        FakeBackend(), FakeBackend(box_offset=0.05), _batches(), atol=1e-2, rtol=1e-2, stat="mean"
    )
    assert report.outputs["boxes"].mean_abs > 1e-2
    assert report.outputs["boxes"].mean_rel < 1e-2 and report.passed


def test_no_tolerance_reports_only_and_nonfinite_fails():
    assert compare(FakeBackend(), FakeBackend(score_offset=1.0), _batches()).passed is None
    report = compare(FakeBackend(), FakeBackend(nan=True), _batches(), atol=1.0)
    assert report.outputs["scores"].nonfinite == 3 and report.passed is False


def test_compare_rejects_bad_input_and_calls_on_batch():
    seen = []
    compare(FakeBackend(), FakeBackend(), _batches(2), on_batch=lambda i, b, r, c: seen.append(i))
    assert seen == [0, 1]
    with pytest.raises(ValueError, match="stat"):
        compare(FakeBackend(), FakeBackend(), _batches(), stat="median")
    with pytest.raises(ValueError, match="output 'logits' missing"):
        compare(FakeBackend(), FakeBackend(), _batches(), outputs=["logits"])
    short = lambda x: {k: v[:, :5] for k, v in FakeBackend().infer(x).items()}  # noqa: E731
    with pytest.raises(ValueError, match="reference shape"):
        compare(FakeBackend(), short, _batches())


def _images(n=4):
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 255, size=(32, 48, 3), dtype=np.uint8) for _ in range(n)]
    return ImageSet(source="random", arrays=arrays)


def test_gates_pass_fp32_and_report_markdown():
    report = run_gates(
        FakeBackend(),
        FakeBackend(),
        _images(),
        precision="fp32",
        gates=GatesConfig(),
        imgsz=(32, 32),
        batch_size=2,
        artifact="fake.onnx",
    )
    names = [r.name for r in report.results]
    assert names == ["parity", "agreement", "map"]
    assert report.passed and report.exit_code == 0
    agreement = report.results[1]
    assert agreement.passed and agreement.detail["agreement"] == 1.0
    assert agreement.detail["reference_detections"] > 0  # not vacuous
    assert report.results[2].passed is None  # no annotations: mAP skipped
    md = report.to_markdown()
    assert "| parity | pass |" in md and "Overall: **PASSED**" in md


def test_gate_failures_set_their_exit_codes():
    shifted = FakeBackend(box_offset=3.0)  # boxes move by 3 px: parity and IoU>=0.9 both fail
    report = run_gates(
        FakeBackend(),
        shifted,
        _images(),
        precision="fp32",
        gates=GatesConfig(),
        imgsz=(32, 32),
        batch_size=2,
    )
    assert not report.passed and report.exit_code == EXIT_CODES["parity"]
    assert report.results[1].passed is False
    int8 = run_gates(
        FakeBackend(),
        shifted,
        _images(),
        precision="int8",
        gates=GatesConfig(),
        imgsz=(32, 32),
        batch_size=2,
    )
    assert int8.results[0].passed is None and int8.results[1].passed is None  # reported only
    assert int8.passed and int8.exit_code == 0


def test_map_gate_is_one_sided_with_precision_tolerance(monkeypatch):
    pytest.importorskip("pycocotools")
    images = _images(2)
    images.image_ids = [1, 2]
    ref = FakeBackend()
    dets = ref.postprocess(ref.infer(images.batches((32, 32), 2).__next__()[0]), [None, None])
    anns = [
        {
            "id": i + 1,
            "image_id": img,
            "category_id": int(d.labels[0]) + 1,
            "iscrowd": 0,
            "bbox": [
                float(d.boxes[0, 0]),
                float(d.boxes[0, 1]),
                float(d.boxes[0, 2] - d.boxes[0, 0]),
                float(d.boxes[0, 3] - d.boxes[0, 1]),
            ],
            "area": 144.0,
        }
        for i, (img, d) in enumerate(zip([1, 2], dets))
    ]
    images.annotations = {
        "images": [{"id": i, "width": 32, "height": 32, "file_name": f"{i}.jpg"} for i in (1, 2)],
        "annotations": anns,
        "categories": [{"id": k, "name": n} for k, n in ((1, "a"), (2, "b"), (3, "c"))],
    }
    report = run_gates(
        ref,
        FakeBackend(),
        images,
        precision="fp16",
        gates=GatesConfig(),
        imgsz=(32, 32),
        batch_size=2,
    )
    gate = report.results[2]
    assert gate.name == "map" and gate.passed is True
    assert gate.detail["tolerance_ap_points"] == 0.3


def test_report_exit_code_is_the_first_failing_gate():
    report = GateReport("x", "fp32", 1, "here")
    report.results = [
        GateResult("parity", True, "", ""),
        GateResult("agreement", False, "", ""),
        GateResult("map", False, "", ""),
    ]
    assert report.exit_code == EXIT_CODES["agreement"] == 4
