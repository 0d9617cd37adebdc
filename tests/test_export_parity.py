"""`parity.compare` (gate 1) on fake runtimes: error statistics and verdicts.

The gate decisions built on it (`gates.run_gates`) are tested in test_export_gates.py.
"""

from __future__ import annotations

import numpy as np
import pytest

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


def test_errors_below_the_reference_count_by_magnitude():
    # a candidate 2e-3 px BELOW the reference is as far off as one above it
    report = compare(FakeBackend(), FakeBackend(box_offset=-2e-3), _batches(), atol=1e-3)
    boxes = report.outputs["boxes"]
    assert boxes.max_abs == pytest.approx(2e-3, rel=1e-2)
    assert boxes.mean_abs == pytest.approx(2e-3, rel=1e-2)
    assert boxes.p99_abs == pytest.approx(2e-3, rel=1e-2)
    assert boxes.mean_rel > 0 and boxes.passed is False and report.passed is False
    mean = compare(FakeBackend(), FakeBackend(box_offset=-0.05), _batches(), atol=1e-2, stat="mean")
    assert mean.outputs["boxes"].mean_abs == pytest.approx(0.05, rel=1e-2)
    assert mean.outputs["boxes"].passed is False  # no rtol: the absolute mean decides


class FirstBatchOff:
    """FakeBackend outputs, with the boxes of the first batch off by 0.5 and the others by 0.1."""

    def __init__(self):
        self.calls = 0

    def __call__(self, batch):
        out = FakeBackend().infer(batch)
        self.calls += 1
        out["boxes"] = out["boxes"] + np.float32(0.5 if self.calls == 1 else 0.1)
        return out


def test_max_error_is_taken_over_every_batch():
    report = compare(FakeBackend(), FirstBatchOff(), _batches(3), atol={"boxes": 0.3})
    boxes = report.outputs["boxes"]
    assert boxes.max_abs == pytest.approx(0.5, rel=1e-5)  # from the first of three batches
    assert boxes.mean_abs == pytest.approx((0.5 + 0.1 + 0.1) / 3, rel=1e-5)
    assert boxes.elements == 3 * 2 * N * 4
    assert boxes.passed is False and report.outputs["scores"].passed is None


class Constant:
    """Outputs of one constant value (exactly representable errors), any batch size."""

    def __init__(self, box: float, score: float = 0.0, n: int = N):
        self.box, self.score, self.n = box, score, n

    def infer(self, batch):
        b = len(batch)
        return {
            "boxes": np.full((b, self.n, 4), self.box, np.float32),
            "scores": np.full((b, self.n, C), self.score, np.float32),
        }


def test_normalised_mean_error_accumulates_over_batches():
    # the candidate is 0.5 everywhere, the reference 2 then 6: errors 1.5 then 5.5
    references = iter([Constant(2.0), Constant(6.0)])
    report = compare(
        lambda batch: next(references).infer(batch),
        Constant(0.5),
        _batches(2),
        outputs=["boxes"],
    )
    boxes = report.outputs["boxes"]
    assert boxes.mean_abs == (1.5 + 5.5) / 2
    assert boxes.mean_rel == (1.5 + 5.5) / (2.0 + 6.0)


def test_p99_is_a_percentile_not_the_max():
    # 0.5% of the box elements are 1.0 off, the rest exact: p99 0, max 1
    def cand(batch):
        out = Constant(0.0).infer(batch)
        out["boxes"].reshape(-1)[::200] = 1.0
        return out

    boxes = compare(Constant(0.0), cand, _batches(2)).outputs["boxes"]
    assert boxes.max_abs == 1.0 and boxes.p99_abs == 0.0


def test_p99_of_large_outputs_is_estimated_from_a_sample():
    n = 60_000  # 2 images x 60000 x 4 = 480000 box elements per batch: sampled (200000 kept)

    def cand(batch):
        out = Constant(0.0, n=n).infer(batch)
        out["boxes"].reshape(-1)[::2] = 1.0  # half the elements off by 1
        return out

    boxes = compare(Constant(0.0, n=n), cand, _batches(1)).outputs["boxes"]
    assert boxes.elements == 480_000 and boxes.max_abs == 1.0 and boxes.p99_abs == 1.0
    assert boxes.mean_abs == 0.5


def test_tolerances_are_inclusive_and_per_output():
    exact = {"boxes": 0.25, "scores": 0.5}
    report = compare(Constant(0.0), Constant(0.25, 0.5), _batches(), atol=exact)
    assert report.passed is True  # max error == atol passes
    mean = compare(Constant(0.0), Constant(0.25, 0.5), _batches(), atol=exact, stat="mean")
    assert mean.passed is True  # mean error == atol passes
    # normalised mean error == rtol passes; rtol may differ per output
    rel = compare(
        Constant(2.0, 4.0),
        Constant(2.5, 5.0),
        _batches(),
        atol=0.0,
        rtol={"boxes": 0.25, "scores": 0.2},
        stat="mean",
    )
    assert rel.outputs["boxes"].mean_rel == 0.25 and rel.outputs["scores"].mean_rel == 0.25
    assert rel.outputs["boxes"].passed is True and rel.outputs["scores"].passed is False


def test_a_missing_candidate_output_is_an_error_and_on_batch_sees_each_batch():
    def no_scores(batch):
        return {"boxes": Constant(0.0).infer(batch)["boxes"]}

    with pytest.raises(ValueError, match="output 'scores' missing.*candidate has \\['boxes'\\]"):
        compare(Constant(0.0), no_scores, _batches())
    batches, seen = _batches(2), []
    compare(Constant(0.0), Constant(0.0), batches, on_batch=lambda i, b, r, c: seen.append(b))
    assert len(seen) == 2 and all(a is b for a, b in zip(seen, batches))


def test_report_dict_and_summary():
    report = compare(Constant(0.0), Constant(0.5), _batches(1), atol={"boxes": 1.0})
    data = report.to_dict()
    assert data["images"] == 2 and data["passed"] is True
    assert data["outputs"]["boxes"]["max_abs"] == 0.5 and data["outputs"]["boxes"]["atol"] == 1.0
    assert data["outputs"]["scores"]["passed"] is None
    assert report.summary() == (
        "boxes: max 0.5 mean 0.5 p99 0.5 (atol 1, max); scores: max 0 mean 0 p99 0"
    )
