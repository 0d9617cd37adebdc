"""CrowdHuman metrics (MR^-2, AP, JI): hand-computed cases and a loop-by-loop reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pgd_deploy.crowd_metrics import (
    MR_REFERENCES,
    clip_boxes,
    crowd_images,
    image_jaccard,
    match_caltech,
)
from pgd_deploy.metrics import crowd_metrics, format_metrics
from tests._crowd_reference import reference_ap_mr, reference_ji


def person(x, y, w, h, **extra):
    return {"tag": "person", "fbox": [x, y, w, h], "vbox": [x, y, w, h], "extra": extra}


def det(image_id, x, y, w, h, score):
    return {"ID": image_id, "box": [x, y, w, h], "score": score}


def record(image_id, *boxes, width=200, height=100):
    return {"ID": image_id, "width": width, "height": height, "gtboxes": list(boxes)}


@pytest.mark.parametrize("n", [1, 2, 5])
def test_perfect_detections_give_mr_0_ap_1_minus_1_over_n_and_ji_1(n):
    gt = [record("a", *(person(10 + 30 * i, 10, 20, 40) for i in range(n)))]
    dets = [det("a", 10 + 30 * i, 10, 20, 40, 0.9 - 0.1 * i) for i in range(n)]
    out = crowd_metrics(gt, dets)
    assert out["mr2"] == 0.0
    assert out["ap"] == pytest.approx(1 - 1 / n)
    assert out["ji"] == 1.0
    assert (out["images"], out["objects"], out["detections"]) == (1, n, n)


def test_no_detections_give_mr_1_ap_0_ji_0():
    out = crowd_metrics([record("a", person(10, 10, 20, 40)), record("b")], [])
    assert (out["mr2"], out["ap"], out["ji"]) == (1.0, 0.0, 0.0)


def test_a_detection_inside_an_ignore_region_is_neither_tp_nor_fp():
    mask = {"tag": "mask", "fbox": [100, 0, 80, 80]}
    ignored = {**person(0, 50, 40, 40), "extra": {"ignore": 1}}
    gt = [record("a", person(10, 10, 20, 40), mask, ignored)]
    perfect = [det("a", 10, 10, 20, 40, 0.5)]
    inside = [det("a", 110, 10, 30, 30, 0.9), det("a", 120, 20, 30, 30, 0.8)]  # one region, two
    on_ignored_person = [det("a", 0, 50, 40, 40, 0.95)]
    images = crowd_images(gt, perfect + inside + on_ignored_person)
    assert match_caltech(images[0]) == [(0.5, True)]
    keys = ("mr2", "ap", "ji")
    with_ignored = crowd_metrics(gt, perfect + inside + on_ignored_person)
    assert [with_ignored[k] for k in keys] == [crowd_metrics(gt, perfect)[k] for k in keys]
    assert crowd_metrics(gt, perfect)["objects"] == 1 and crowd_metrics(gt, perfect)["ignore"] == 2


def test_a_detection_half_inside_an_ignore_region_is_a_false_positive():
    """Dropped only when the intersection over the detection's own area exceeds 0.5."""
    gt = [record("a", person(10, 10, 20, 40), {"tag": "mask", "fbox": [100, 0, 80, 80]})]
    half = det("a", 80, 10, 40, 20, 0.9)  # IoA exactly 0.5
    assert match_caltech(crowd_images(gt, [half])[0]) == [(0.9, False)]


def test_one_false_positive_per_image_moves_fppi_to_1():
    """Two images, one object each; each image's top detection is a false positive: after both,
    FPPI is 1 and nothing is found yet, so every reference reads a miss rate of 1."""
    gt = [record("a", person(10, 10, 20, 40)), record("b", person(10, 10, 20, 40))]
    fps = [det("a", 150, 50, 20, 20, 0.95), det("b", 150, 50, 20, 20, 0.94)]
    hits = [det("a", 10, 10, 20, 40, 0.9), det("b", 10, 10, 20, 40, 0.8)]
    assert crowd_metrics(gt, fps + hits)["mr2"] == 1.0
    # Below the objects' scores the same FPs cost nothing before FPPI 0.5: the refs under 0.5
    # read a miss rate of 0 at the first detection reaching them... and 0 is kept in the mean.
    late = [det("a", 150, 50, 20, 20, 0.5), det("b", 150, 50, 20, 20, 0.4)]
    assert crowd_metrics(gt, hits + late)["mr2"] == 0.0


def test_mr2_reads_each_reference_at_the_first_detection_reaching_it():
    """10 images, 10 objects; ranked: TP, FP, TP, FP x 8, ...: FPPI after k FPs is k / 10."""
    gt = [record(str(i), person(10, 10, 20, 40)) for i in range(10)]
    dets = [det("0", 10, 10, 20, 40, 0.99), det("1", 150, 50, 20, 20, 0.98)]
    dets += [det("2", 10, 10, 20, 40, 0.97)]
    dets += [det(str(i), 150, 50, 20, 20, 0.9 - 0.01 * i) for i in range(2, 10)]
    # FP counts: the first FP (fppi 0.1) answers refs <= 0.1 with miss 0.9; the second FP
    # (fppi 0.2) answers 0.1778 with miss 0.8; 0.3162 at fppi 0.4, 0.5623 at 0.6, 1.0 never
    # reached: the last detection, miss 0.8.
    expected = [0.9] * 5 + [0.8] * 4
    out = crowd_metrics(gt, dets)
    assert out["mr2"] == pytest.approx(math.exp(np.mean(np.log(expected))))
    assert len(MR_REFERENCES) == 9


def test_a_duplicate_of_a_matched_detection_is_a_false_positive():
    gt = [record("a", person(10, 10, 20, 40), person(100, 10, 20, 40))]
    dets = [det("a", 10, 10, 20, 40, 0.9), det("a", 11, 10, 20, 40, 0.8)]
    assert match_caltech(crowd_images(gt, dets)[0]) == [(0.9, True), (0.8, False)]
    # ranked TP, FP over 2 objects: recall .5, .5; precision 1, .5 -> area 0
    assert crowd_metrics(gt, dets)["ap"] == 0.0
    dets.append(det("a", 100, 10, 20, 40, 0.7))  # recall 1 at precision 2/3
    assert crowd_metrics(gt, dets)["ap"] == pytest.approx(0.5 * (0.5 + 2 / 3) / 2)


def test_a_detection_takes_the_unmatched_object_of_highest_iou_above_one_half_strictly():
    gt = [record("a", person(0, 0, 10, 10), person(0, 0, 12, 10))]
    exactly_half = det("a", 0, 0, 20, 10, 0.9)  # IoU 0.5 with the first, 0.6 with the second
    images = crowd_images(gt, [exactly_half, det("a", 0, 0, 20, 10, 0.8)])
    assert match_caltech(images[0]) == [(0.9, True), (0.8, False)]  # the second took the 0.6
    assert image_jaccard(crowd_images(gt, [exactly_half])[0], 0.0) == (0.5, 2, 1)


def test_ji_is_a_one_to_one_matching_that_leaves_out_what_ignore_regions_cover():
    mask = {"tag": "mask", "fbox": [100, 0, 100, 100]}
    gt = [
        record("a", person(10, 10, 20, 40), person(40, 10, 20, 40), person(110, 10, 20, 40), mask)
    ]
    dets = [
        det("a", 10, 10, 20, 40, 0.9),  # matches the first object
        det("a", 12, 10, 20, 40, 0.45),  # a duplicate: unmatched, counted in n
        det("a", 150, 50, 20, 20, 0.3),  # inside the mask: left out of n
    ]
    # k = 1; m = 3 objects - 1 unmatched object under the mask = 2; n = 3 - 1 = 2
    images = crowd_images(gt, dets)
    assert image_jaccard(images[0], 0.0) == (1 / 3, 2, 2)
    assert image_jaccard(images[0], 0.45) == (1 / 2, 2, 1)  # strictly above: the 0.45 is out
    assert image_jaccard(images[0], 0.9) == (0.0, 2, 0)
    out = crowd_metrics(gt, dets)
    assert out["ji"] == 0.5 and out["ji_score_thresh"] == 0.5  # the first threshold giving it


def test_ji_averages_over_images_with_an_object_or_a_detection():
    gt = [record("a", person(10, 10, 20, 40)), record("empty"), record("b", person(10, 10, 20, 40))]
    dets = [det("a", 10, 10, 20, 40, 0.9), det("b", 150, 50, 20, 20, 0.9)]
    assert crowd_metrics(gt, dets)["ji"] == pytest.approx((1 + 0) / 2)


def test_boxes_outside_the_image_are_clipped_for_objects_and_detections_alike():
    box = np.array([[-30.0, -5.0, 250.0, 130.0]])
    assert clip_boxes(box, 200, 100).tolist() == [[0.0, 0.0, 200.0, 100.0]]
    assert clip_boxes(np.array([[250.0, 150.0, 260.0, 160.0]]), 200, 100).tolist() == [
        [199.0, 99.0, 200.0, 100.0]
    ]
    # An object reaching far out of the frame matches a detection of its visible part.
    gt = [record("a", person(-100, 10, 140, 40))]
    assert crowd_metrics(gt, [det("a", 0, 10, 40, 40, 0.9)])["mr2"] == 0.0
    unclipped = [{k: v for k, v in gt[0].items() if k not in ("width", "height")}]
    assert crowd_metrics(unclipped, [det("a", 0, 10, 40, 40, 0.9)])["mr2"] == 1.0


def test_vbox_is_evaluated_on_request():
    gt = [record("a", {**person(10, 10, 20, 40), "vbox": [10, 10, 20, 20]})]
    visible = [det("a", 10, 10, 20, 20, 0.9)]
    assert crowd_metrics(gt, visible, box_key="vbox")["mr2"] == 0.0
    assert crowd_metrics(gt, visible)["mr2"] == 1.0
    with pytest.raises(ValueError, match="box_key must be one of"):
        crowd_metrics(gt, visible, box_key="box")


@pytest.mark.parametrize("seed", range(6))
def test_the_metrics_equal_a_loop_by_loop_reference_on_random_crowds(seed):
    rng = np.random.default_rng(seed)
    gt, dets = [], []
    for i in range(6):
        boxes = []
        for _ in range(rng.integers(0, 8)):
            x, y = rng.uniform(-20, 180, 2)
            w, h = rng.uniform(5, 60, 2)
            tag = "mask" if rng.random() < 0.15 else "person"
            boxes.append(
                {"tag": tag, "fbox": [x, y, w, h], "extra": {"ignore": int(rng.random() < 0.1)}}
            )
        gt.append(record(str(i), *boxes))
        for box in boxes:
            for _ in range(rng.integers(0, 3)):
                jitter = rng.normal(0, 4, 4)
                dets.append(det(str(i), *(np.add(box["fbox"], jitter)), float(rng.random())))
        for _ in range(rng.integers(0, 4)):
            dets.append(
                det(str(i), *rng.uniform(0, 100, 2), *rng.uniform(5, 40, 2), float(rng.random()))
            )
    if not any(b["tag"] == "person" and not b["extra"]["ignore"] for r in gt for b in r["gtboxes"]):
        gt[0]["gtboxes"].append(person(10, 10, 20, 40))
    out = crowd_metrics(gt, dets)
    ap, mr = reference_ap_mr(gt, dets)
    assert out["ap"] == pytest.approx(ap, abs=1e-12)
    assert out["mr2"] == pytest.approx(mr, abs=1e-12)
    assert out["ji"] == pytest.approx(reference_ji(gt, dets), abs=1e-12)


@pytest.mark.parametrize(
    ("gt", "dets", "message"),
    [
        ([record("a", person(1, 1, 5, 5))], [det("b", 1, 1, 5, 5, 0.5)], "'ID' names 'b'"),
        ([record("a", person(1, 1, 5, 5))], [{"ID": "a", "box": [1, 1, 5], "score": 1}], "'box'"),
        ([record("a", person(1, 1, 5, 5))], [{"ID": "a", "box": [1, 1, 5, 5]}], "'score'"),
        ([record("a", person(1, 1, 5, 5))], [det("a", 1, 1, 5, float("nan"), 1)], "non-finite"),
        ([{"gtboxes": []}], [], "record 0: missing field 'ID'"),
        ([record("a"), record("a")], [], "ID 'a' appears twice"),
        ([record("a", {"fbox": [1, 1, 5, 5]})], [], r"gtboxes\[0\].*'tag'"),
        ([record("a", {"tag": "person", "fbox": [1, 1]})], [], "field 'fbox'"),
        ([record("a", {"tag": "mask", "fbox": [1, 1, 4, 4]})], [], "no 'person' box"),
        ([{**record("a", person(1, 1, 5, 5)), "width": 0}], [], "'width' and 'height'"),
    ],
)
def test_malformed_input_is_refused_with_the_record_and_field(gt, dets, message):
    with pytest.raises(ValueError, match=message):
        crowd_metrics(gt, dets)


def test_format_metrics_prints_the_crowd_metrics_in_points():
    text = format_metrics({"MR2": 0.428, "AP": 0.9, "JI": 0.79})
    assert text.splitlines()[0] == "CrowdHuman"
    assert text.splitlines()[1].split() == ["MR^-2", "AP", "JI"]
    assert text.splitlines()[2].split() == ["42.8", "90.0", "79.0"]


def _coco(categories=({"id": 1, "name": "person"},)):
    return {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 200, "height": 100, "crowd_id": "x,1"},
            {"id": 2, "file_name": "b.jpg", "width": 200, "height": 100},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 40], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [100, 0, 80, 80], "iscrowd": 1},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [10, 10, 20, 40], "iscrowd": 0},
        ],
        "categories": list(categories),
    }


def _result(image_id, bbox, score):
    return {"image_id": image_id, "category_id": 1, "bbox": bbox, "score": score}


def test_evaluate_crowd_reads_coco_ground_truth_with_iscrowd_as_ignore_regions():
    from pgd_deploy.metrics import evaluate

    results = [
        _result(1, [10, 10, 20, 40], 0.9),
        _result(1, [110, 10, 30, 30], 0.95),  # in the iscrowd region: dropped
        _result(2, [150, 50, 20, 20], 0.5),  # a false positive
    ]
    out = evaluate(_coco(), results, metric="crowd")
    assert set(out) == {"MR2", "AP", "JI"}
    # ranked: TP (1/2 found), FP: recall .5, .5 -> AP 0; one FP over 2 images -> FPPI .5
    assert out["AP"] == 0.0
    assert out["MR2"] == pytest.approx(0.5)  # every reference reads a miss rate of 1/2
    assert out["JI"] == 0.5  # image 1: 1 / 1 (the dropped one left out); image 2: 0 / 1
    only_first = evaluate(_coco(), results, image_ids=[1], metric="crowd")
    assert (only_first["MR2"], only_first["AP"], only_first["JI"]) == (0.0, 0.0, 1.0)


def test_evaluate_crowd_refuses_more_than_one_class_and_unknown_metrics():
    from pgd_deploy.metrics import evaluate

    two = _coco(({"id": 1, "name": "person"}, {"id": 2, "name": "car"}))
    with pytest.raises(ValueError, match="field 'categories'.*one class, found 2"):
        evaluate(two, [], metric="crowd")
    with pytest.raises(ValueError, match="metric must be one of"):
        evaluate(_coco(), [], metric="voc")
    with pytest.raises(ValueError, match="'image_id' names 1 image"):
        evaluate(_coco(), [_result(7, [1, 1, 2, 2], 0.5)], metric="crowd")


def test_pgd_train_eval_scores_a_results_file_with_the_crowd_metrics(tmp_path, capsys):
    import json

    from pgd_deploy.cli import train_main

    (tmp_path / "gt.json").write_text(json.dumps(_coco()))
    (tmp_path / "dets.json").write_text(json.dumps([_result(1, [10, 10, 20, 40], 0.9)]))
    args = ["eval", "--annotations", str(tmp_path / "gt.json")]
    args += ["--predictions", str(tmp_path / "dets.json"), "--json", str(tmp_path / "m.json")]
    assert train_main([*args, "--metric", "crowd"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["CrowdHuman", " MR^-2     AP     JI"]
    assert json.loads((tmp_path / "m.json").read_text()) == {"MR2": 0.5, "AP": 0.0, "JI": 0.5}
