"""The mAP gate under the crowd metrics (`data.metric = "crowd"`): MR^-2 may not rise, lower is
better, and AP may not drop, each by more than the precision's tolerance (points)."""

from __future__ import annotations

import pytest

from pgd_deploy.export.images import ImageSet
from tests.test_export_gates import LOOSE_PARITY, OBJECTS, SIDE, Scripted, _gates, _images, _result

PERSONS = [(x, y, 0, score) for x, y, _, score in OBJECTS]  # one class: the four objects
FALSE_POSITIVE = (20.0, 20.0, 0, 0.95)  # between the objects, above every true detection


class Crowd(Scripted):
    """A scripted model of a crowd dataset: its evaluation uses the crowd metrics."""

    def __init__(self, objects):
        super().__init__(objects)
        self.metric = "crowd"


def _crowd_images() -> ImageSet:
    images = _images()
    assert images.annotations is not None
    images.annotations["categories"] = [{"id": 1, "name": "person"}]
    for ann in images.annotations["annotations"]:
        ann["category_id"] = 1
    images.annotations["annotations"].append(  # an ignore region in the last image
        {"id": 99, "image_id": 4, "category_id": 1, "bbox": [0, 0, SIDE, SIDE], "iscrowd": 1}
    )
    return images


def _crowd_gates(reference, candidate, **gates):
    return _gates(reference, candidate, images=_crowd_images(), **LOOSE_PARITY,
                  agreement_min_fp32=0.0, **gates)  # fmt: skip


def test_an_exact_copy_passes_with_its_mr2_ap_and_ji_reported():
    gate = _result(_crowd_gates(Crowd(PERSONS), Crowd(PERSONS)), "map")
    assert gate.passed is True and gate.detail["metric"] == "crowd"
    # 16 objects, all found (image 4's first one also lies in its ignore region: a match
    # with an object comes first), no false positive
    assert gate.detail["exported"] == gate.detail["reference"] == {
        "MR2": 0.0, "AP": 1 - 1 / 16, "JI": 1.0
    }  # fmt: skip
    assert gate.value.startswith("MR^-2 0.00 vs PyTorch 0.00 (delta +0.00, lower is better); AP")
    assert gate.threshold == "MR^-2 rise <= 0.1, AP drop <= 0.1 AP"


@pytest.mark.parametrize(("tolerance", "passed"), [(25.0, True), (24.9, False)])
def test_an_export_that_raises_mr2_beyond_the_tolerance_fails_though_its_ap_rises(
    tolerance, passed
):
    """The reference finds one person per image (miss rate 0.75 at every FPPI, MR^-2 75); the
    export finds all four but ranks a false positive first in every image: FPPI reaches 1
    before its first true detection, MR^-2 100. Its AP is higher."""
    reference, export = Crowd(PERSONS[:1]), Crowd([FALSE_POSITIVE, *PERSONS])
    gate = _result(_crowd_gates(reference, export, map_tolerance_fp32=tolerance), "map")
    ref, cand = gate.detail["reference"], gate.detail["exported"]
    assert (100 * ref["MR2"], 100 * cand["MR2"]) == (75.0, 100.0)
    assert cand["AP"] > ref["AP"]
    assert gate.passed is passed


def test_an_export_that_lowers_mr2_passes_the_one_sided_gate():
    reference, export = Crowd([FALSE_POSITIVE, *PERSONS]), Crowd(PERSONS[:1])
    gate = _result(_crowd_gates(reference, export, map_tolerance_fp32=100.0), "map")
    assert gate.detail["exported"]["MR2"] < gate.detail["reference"]["MR2"]
    assert gate.passed is True


def test_a_models_metric_is_its_training_datas():
    from pgd_deploy.runtime.backend_base import evaluation_metric

    crowd = {"source": {"train_config": {"data": {"metric": "crowd"}}}}
    assert evaluation_metric(crowd) == "crowd"
    assert evaluation_metric({"metric": "crowd", **crowd}) == "crowd"
    assert evaluation_metric({"source": {"train_config": {"data": {}}}}) == "coco"
    assert evaluation_metric({}) == "coco"  # a manifest from before data.metric
    assert Crowd(PERSONS).metric == "crowd" and Scripted().metric == "coco"
