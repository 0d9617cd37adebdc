"""`gates.run_gates` decisions on scripted runtimes with known detections, scored by pycocotools.

Each scripted runtime returns the dense contract outputs (boxes [B, N, 4], scores [B, N, C]) of a
fixed set of objects, so every gate value here is known in advance: the ground truth fed back as
detections scores AP 1.0, and a 2.5 px shift of 16 px boxes (IoU 13.5 / 18.5 = 0.73) keeps the
matches at IoU thresholds 0.50-0.70 only, AP 0.5 exactly. The end-to-end gates on a trained
checkpoint and its real ONNX artifacts are in test_export_command.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from pgd_deploy.config import GatesConfig
from pgd_deploy.export.gates import (
    EXIT_CODES,
    GateReport,
    GateResult,
    map_tolerance,
    parity_tolerances,
    run_gates,
)
from pgd_deploy.export.images import ImageSet
from pgd_deploy.runtime.backends import Backend

SIZE = 64  # images and network input: the letterbox is the identity
N, C = 24, 3  # locations, classes
SIDE = 16.0
# Four well-separated 16 px objects per image: (x1, y1, class, score).
OBJECTS = [(4.0, 4.0, 0, 0.9), (36.0, 4.0, 1, 0.8), (4.0, 36.0, 2, 0.7), (36.0, 36.0, 0, 0.6)]
EXTRA = [(20.0, 20.0, 1, 0.5), (44.0, 20.0, 2, 0.4)]  # more objects, apart from the others
SHIFT = 2.5  # IoU (16 - 2.5) / (16 + 2.5) = 0.730: matched at 0.50..0.70, AP 0.5
LOOSE_PARITY = {"fp32_box_atol": 1e3, "fp32_score_atol": 1e3}  # let the later gates decide


class Scripted(Backend):
    """Dense outputs holding `objects` at locations 0.. (scores 0 elsewhere), per image.

    Args:
        objects: (x1, y1, class, score) of each SIDE x SIDE box.
        shift: added to the x coordinates of the objects' boxes.
        score_scale: multiplies the objects' scores.
        box_offset, score_offset: added to every output element (parity tests).
    """

    def __init__(
        self,
        objects=OBJECTS,
        *,
        shift=0.0,
        score_scale=1.0,
        box_offset=0.0,
        score_offset=0.0,
    ):
        super().__init__({"imgsz": [SIZE, SIZE], "class_names": ["a", "b", "c"]})
        boxes = np.zeros((N, 4), np.float32)
        scores = np.zeros((N, C), np.float32)
        for i, (x, y, label, score) in enumerate(objects):
            boxes[i] = [x + shift, y, x + shift + SIDE, y + SIDE]
            scores[i, label] = score * score_scale
        self.boxes, self.scores = boxes + box_offset, scores + score_offset

    def infer(self, images):
        b = len(images)
        return {
            "boxes": np.repeat(self.boxes[None], b, axis=0),
            "scores": np.repeat(self.scores[None], b, axis=0),
        }


def _images(n: int = 4, annotated: bool = True) -> ImageSet:
    arrays = [np.full((SIZE, SIZE, 3), 40 * i, np.uint8) for i in range(n)]
    images = ImageSet(source="scripted", arrays=arrays, image_ids=list(range(1, n + 1)))
    if annotated:
        anns = [
            {
                "id": len(OBJECTS) * (image_id - 1) + k + 1,
                "image_id": image_id,
                "category_id": label + 1,
                "bbox": [x, y, SIDE, SIDE],
                "area": SIDE * SIDE,
                "iscrowd": 0,
            }
            for image_id in images.image_ids
            for k, (x, y, label, _) in enumerate(OBJECTS)
        ]
        images.annotations = {
            "images": [
                {"id": i, "width": SIZE, "height": SIZE, "file_name": f"{i}.png"}
                for i in images.image_ids
            ],
            "annotations": anns,
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate("abc")],
        }
    return images


def _gates(
    reference, candidate, precision="fp32", images=None, artifact="scripted", **gates
) -> GateReport:
    return run_gates(
        reference,
        candidate,
        images if images is not None else _images(),
        precision=precision,
        gates=GatesConfig(**gates),
        imgsz=(SIZE, SIZE),
        batch_size=3,  # 4 images: a full and a partial batch
        artifact=artifact,
    )


def _result(report: GateReport, name: str) -> GateResult:
    (result,) = [r for r in report.results if r.name == name]
    return result


# --------------------------------------------------------------------------------------------
# All three gates pass on an exact copy; the report
# --------------------------------------------------------------------------------------------


def test_exact_copy_passes_all_three_gates_with_ap_one() -> None:
    report = _gates(Scripted(), Scripted())
    assert [r.name for r in report.results] == ["parity", "agreement", "map"]
    assert report.passed and report.exit_code == 0 and report.images == 4
    agreement = _result(report, "agreement")
    assert agreement.passed is True and agreement.detail["agreement"] == 1.0
    assert agreement.detail["reference_detections"] == 16  # 4 objects x 4 images: not vacuous
    gate = _result(report, "map")
    assert gate.passed is True
    # the ground truth fed back as detections: AP 1.0 on both sides
    assert gate.detail["reference"]["AP"] == gate.detail["exported"]["AP"] == 1.0
    assert gate.value == "AP 100.00 vs PyTorch 100.00 (delta +0.00)"
    md = report.to_markdown()
    assert "| parity | pass |" in md and "| map | pass |" in md and "Overall: **PASSED**" in md


def test_without_annotations_the_map_gate_is_skipped_not_passed() -> None:
    report = _gates(Scripted(), Scripted(shift=SHIFT), images=_images(annotated=False))
    gate = _result(report, "map")
    assert gate.passed is None and gate.value == "skipped" and gate.detail == {"skipped": True}


def test_report_exit_code_is_the_first_failing_gate() -> None:
    report = GateReport("x", "fp32", 1, "here")
    report.results = [
        GateResult("parity", True, "", ""),
        GateResult("agreement", False, "", ""),
        GateResult("map", False, "", ""),
    ]
    assert report.exit_code == EXIT_CODES["agreement"] == 4 and not report.passed
    report.results[1].passed = None  # reported only: does not fail
    assert report.exit_code == EXIT_CODES["map"] == 5
    assert "| agreement | report |" in report.to_markdown()


# --------------------------------------------------------------------------------------------
# Parity: the fp32 tolerance of each output is its own
# --------------------------------------------------------------------------------------------


def test_fp32_parity_uses_the_box_tolerance_for_boxes_and_the_score_one_for_scores() -> None:
    gates = {"fp32_box_atol": 0.5, "fp32_score_atol": 0.01}
    assert parity_tolerances("fp32", GatesConfig(**gates)) == {
        "atol": {"boxes": 0.5, "scores": 0.01}
    }
    boxes_off = _gates(Scripted(), Scripted(box_offset=0.1), **gates)  # 0.1 px: within 0.5
    assert _result(boxes_off, "parity").passed is True and boxes_off.exit_code == 0
    scores_off = _gates(Scripted(), Scripted(score_offset=0.02), **gates)  # above 0.01
    parity = _result(scores_off, "parity")
    assert parity.passed is False and scores_off.exit_code == EXIT_CODES["parity"] == 3
    assert parity.detail["outputs"]["boxes"]["passed"] is True
    assert parity.detail["outputs"]["scores"]["passed"] is False
    assert parity.threshold == "boxes max <= 0.5, scores max <= 0.01"


def test_parity_tolerances_per_precision() -> None:
    gates = GatesConfig(fp16_mean_abs=0.2, fp16_mean_rel=0.3)
    assert parity_tolerances("fp16", gates) == {"atol": 0.2, "rtol": 0.3, "stat": "mean"}
    assert parity_tolerances("int8", gates) == {"atol": None}
    int8 = _gates(Scripted(), Scripted(box_offset=3.0), precision="int8")
    assert _result(int8, "parity").passed is None and "reported only" in int8.to_markdown()


# --------------------------------------------------------------------------------------------
# Agreement: the fraction of the REFERENCE detections the export reproduces
# --------------------------------------------------------------------------------------------


def test_agreement_counts_reference_detections_found_by_the_export() -> None:
    # The export finds every reference detection and two more per image: agreement 1.0, the
    # reverse direction 16 / 24.
    superset = _gates(Scripted(), Scripted([*OBJECTS, *EXTRA]), **LOOSE_PARITY)
    agreement = _result(superset, "agreement")
    assert agreement.passed is True and superset.exit_code == 0
    assert agreement.detail["agreement"] == 1.0
    assert agreement.detail["reverse_agreement"] == pytest.approx(16 / 24)
    assert (agreement.detail["reference_detections"], agreement.detail["exported_detections"]) == (
        16,
        24,
    )
    # The export loses half of the reference detections: agreement 0.5 fails (exit 4).
    subset = _gates(Scripted(), Scripted(OBJECTS[:2]), **LOOSE_PARITY)
    agreement = _result(subset, "agreement")
    assert agreement.detail["agreement"] == 0.5 and agreement.detail["reverse_agreement"] == 1.0
    assert agreement.passed is False and subset.exit_code == EXIT_CODES["agreement"] == 4
    assert agreement.value == "0.5000 of 16 reference detections (8 exported)"


def test_agreement_needs_iou_09_and_the_same_class() -> None:
    shifted = _result(_gates(Scripted(), Scripted(shift=SHIFT), **LOOSE_PARITY), "agreement")
    assert shifted.detail["agreement"] == 0.0 and shifted.passed is False  # IoU 0.73 < 0.9
    relabelled = [(x, y, (label + 1) % C, s) for x, y, label, s in OBJECTS]
    other = _result(_gates(Scripted(), Scripted(relabelled), **LOOSE_PARITY), "agreement")
    assert other.detail["agreement"] == 0.0 and other.passed is False


def test_no_reference_detections_is_reported_not_passed() -> None:
    quiet = Scripted(score_scale=0.01)  # every score below the 0.05 threshold
    both_empty = _result(_gates(quiet, Scripted(score_scale=0.01), **LOOSE_PARITY), "agreement")
    assert both_empty.passed is None
    assert both_empty.value == "no reference detections above 0.05 (0 exported)"
    # the export detects things the reference does not: a failure, not a vacuous pass
    report = _gates(quiet, Scripted(), **LOOSE_PARITY)
    only_export = _result(report, "agreement")
    assert only_export.passed is False and report.exit_code == EXIT_CODES["agreement"]
    assert only_export.value == "no reference detections above 0.05 (16 exported)"


def test_agreement_minimum_per_precision() -> None:
    three = Scripted(OBJECTS[:3])  # three of the four objects per image: agreement 0.75
    for minimum, passed in ((0.75, True), (0.76, False)):
        report = _gates(Scripted(), three, **LOOSE_PARITY, agreement_min_fp32=minimum)
        assert _result(report, "agreement").passed is passed
    # fp16 is judged against its own minimum, not the fp32 one
    fp16 = {"fp16_mean_abs": 1e3}
    report = _gates(Scripted(), three, "fp16", **fp16, agreement_min_fp16=0.7)
    assert _result(report, "agreement").passed is True
    report = _gates(
        Scripted(), three, "fp16", **fp16, agreement_min_fp16=0.8, agreement_min_fp32=0.5
    )
    assert _result(report, "agreement").passed is False
    int8 = _result(_gates(Scripted(), Scripted(OBJECTS[:1]), "int8"), "agreement")
    assert int8.passed is False and int8.threshold == ">= 0.9 at IoU 0.5"  # gated like the rest
    int8 = _result(
        _gates(Scripted(), Scripted(OBJECTS[:1]), "int8", agreement_min_int8=0.0), "agreement"
    )
    assert int8.passed is None and int8.threshold == "reported"  # minimum 0: reported only


def test_int8_agreement_counts_a_box_at_iou_half_and_reports_the_fp32_one() -> None:
    """int8 moves a box edge by a grid step or two: a same-class box at IoU >= 0.5 reproduces
    the source's detection (the shifted boxes, IoU 0.73, fail fp32's 0.9); without a separate
    fp32 model (post-training int8) the agreement with fp32 is the gate's own."""
    shifted = Scripted(shift=SHIFT)
    fp32 = _result(_gates(Scripted(), shifted, **LOOSE_PARITY), "agreement")
    assert fp32.detail["agreement"] == 0.0 and fp32.detail["iou"] == 0.9
    assert "agreement_with_fp32" not in fp32.detail  # fp32 and fp16 are their own fp32 story
    int8 = _result(_gates(Scripted(), shifted, "int8"), "agreement")
    assert int8.passed is True and int8.detail["agreement"] == 1.0 and int8.detail["iou"] == 0.5
    assert (
        int8.detail["agreement_with_fp32"] == 1.0 and int8.detail["agreement_with_fp32_iou"] == 0.5
    )
    assert "with the fp32 model 1.0000 (reported)" in int8.value


# --------------------------------------------------------------------------------------------
# mAP: one-sided, against the precision's own tolerance, with known AP values
# --------------------------------------------------------------------------------------------


def test_a_known_box_shift_gives_a_known_ap_drop_and_fails_the_map_gate() -> None:
    report = _gates(Scripted(), Scripted(shift=SHIFT), **LOOSE_PARITY, agreement_min_fp32=0.0)
    gate = _result(report, "map")
    exported = gate.detail["exported"]
    assert (exported["AP"], exported["AP50"], exported["AP75"]) == (0.5, 1.0, 0.0)
    assert gate.detail["reference"]["AP"] == 1.0
    assert gate.value == "AP 50.00 vs PyTorch 100.00 (delta -50.00)"
    assert gate.passed is False and report.exit_code == EXIT_CODES["map"] == 5
    assert _result(report, "agreement").passed is None  # minimum 0: reported only


def test_map_gate_is_one_sided() -> None:
    # The export scores BETTER than the reference (AP 100 vs 50): that passes.
    report = _gates(Scripted(shift=SHIFT), Scripted(), **LOOSE_PARITY, agreement_min_fp32=0.0)
    gate = _result(report, "map")
    assert gate.value == "AP 100.00 vs PyTorch 50.00 (delta +50.00)"
    assert gate.passed is True and report.exit_code == 0


@pytest.mark.parametrize(("tolerance", "passed"), [(50.0, True), (49.9, False)])
def test_map_drop_equal_to_the_tolerance_passes(tolerance: float, passed: bool) -> None:
    report = _gates(
        Scripted(),
        Scripted(shift=SHIFT),
        **LOOSE_PARITY,
        agreement_min_fp32=0.0,
        map_tolerance_fp32=tolerance,
    )
    gate = _result(report, "map")
    assert gate.passed is passed and gate.threshold == f"drop <= {tolerance:g} AP"


def test_each_precision_has_its_own_map_tolerance() -> None:
    gates = {"map_tolerance_fp32": 10.0, "map_tolerance_fp16": 30.0, "map_tolerance_int8": 60.0}
    config = GatesConfig(**gates)
    assert [map_tolerance(p, config) for p in ("fp32", "fp16", "int8")] == [10.0, 30.0, 60.0]
    # the same 50-point drop: within the int8 tolerance, beyond the fp32 and fp16 ones
    int8 = _gates(Scripted(), Scripted(shift=SHIFT), "int8", **gates)
    assert _result(int8, "map").passed is True and int8.exit_code == 0
    assert _result(int8, "map").detail["tolerance_ap_points"] == 60.0
    loose = {**LOOSE_PARITY, "fp16_mean_abs": 1e3, "agreement_min_fp32": 0.0}
    loose["agreement_min_fp16"] = 0.0
    for precision in ("fp32", "fp16"):
        report = _gates(Scripted(), Scripted(shift=SHIFT), precision, **gates, **loose)
        assert _result(report, "map").passed is False, precision
        assert report.exit_code == EXIT_CODES["map"], precision


# --------------------------------------------------------------------------------------------
# What each gate runs on, and what the report says
# --------------------------------------------------------------------------------------------


def test_in_graph_nms_artifact_parity_on_the_dense_model_detections_from_the_artifact() -> None:
    # The dense model matches the reference exactly, the artifact's detections are shifted:
    # parity (dense) passes, agreement (the artifact's own detections) fails.
    report = run_gates(
        Scripted(),
        Scripted(shift=SHIFT),
        _images(),
        precision="fp32",
        gates=GatesConfig(),
        imgsz=(SIZE, SIZE),
        batch_size=3,
        dense_candidate=Scripted(),
    )
    parity = _result(report, "parity")
    assert parity.passed is True and parity.detail["outputs"]["boxes"]["max_abs"] == 0.0
    assert _result(report, "agreement").passed is False
    assert report.exit_code == EXIT_CODES["agreement"]


def test_the_export_is_post_processed_with_the_references_thresholds() -> None:
    strict = Scripted()
    strict.postprocess_kwargs = {**strict.postprocess_kwargs, "score_thresh": 0.95}
    report = _gates(Scripted(), strict)  # its own 0.95 threshold would drop every detection
    assert _result(report, "agreement").detail["agreement"] == 1.0 and report.exit_code == 0


def test_map_is_measured_on_the_gate_images_only() -> None:
    images = _images()
    extra = {"id": 99, "width": SIZE, "height": SIZE, "file_name": "99.png"}
    images.annotations["images"].append(extra)  # annotated, but not among the gate images
    images.annotations["annotations"].append(
        {
            "id": 999,
            "image_id": 99,
            "category_id": 1,
            "bbox": [1, 1, 9, 9],
            "area": 81,
            "iscrowd": 0,
        }
    )
    gate = _result(_gates(Scripted(), Scripted(), images=images), "map")
    assert gate.detail["reference"]["AP"] == 1.0  # image 99's missed object does not count


def test_report_dict_and_markdown() -> None:
    report = _gates(Scripted(), Scripted(OBJECTS[:2]), artifact="model.onnx (ORT)", **LOOSE_PARITY)
    data = report.to_dict()
    assert set(data) == {"passed", "images", "image_source", "results", "references"}
    assert data["references"] == {}  # filled for QAT exports and torch precision gates only
    assert data["passed"] is False and data["images"] == 4 and data["image_source"] == "scripted"
    assert [r["name"] for r in data["results"]] == ["parity", "agreement", "map"]
    # the reference's post-processing settings ride along (same_candidates)
    assert data["results"][1]["detail"].pop("reference_postprocess")["score_thresh"] == 0.05
    assert data["results"][1] == {
        "name": "agreement",
        "passed": False,
        "value": "0.5000 of 16 reference detections (8 exported)",
        "threshold": ">= 0.99 at IoU 0.9",
        "detail": {
            "agreement": 0.5,
            "reverse_agreement": 1.0,
            "reference_detections": 16,
            "exported_detections": 8,
            "score_thresh": 0.05,
            "iou": 0.9,
            "minimum": 0.99,
        },
    }
    parity = data["results"][0]
    # objects 2 and 3 missing: boxes 52 px max, 288 / 96 mean; scores 0.7 max, 1.3 / 72 mean
    assert parity["value"] == "boxes max 5.20e+01 mean 3.00e+00, scores max 7.00e-01 mean 1.81e-02"
    assert parity["detail"] == report.results[0].detail and parity["detail"]["passed"] is True
    assert report.to_markdown() == "\n".join(
        [
            "### Gates: model.onnx (ORT) (fp32)",
            "",
            "4 images from scripted",
            "",
            "| gate | result | measured | required |",
            "|---|---|---|---|",
            f"| parity | pass | {parity['value']} | boxes max <= 1000, scores max <= 1000 |",
            "| agreement | FAIL | 0.5000 of 16 reference detections (8 exported) "
            "| >= 0.99 at IoU 0.9 |",
            f"| map | FAIL | {data['results'][2]['value']} | drop <= 0.1 AP |",
            "",
            "Overall: **FAILED**",
            "",
        ]
    )
    fp16 = _result(_gates(Scripted(), Scripted(), "fp16"), "parity")
    assert fp16.threshold == "mean abs <= 0.01 or normalised mean <= 0.01"
    int8 = _result(_gates(Scripted(), Scripted(), "int8"), "parity")
    assert int8.threshold == "reported only" and int8.value.startswith("boxes max 0.00e+00")
