"""The ATSS recipes (issue 35, part 4): the official ones are the recommended ones plus the
official-code switches, every COCO recipe runs on the synthetic data, and the quickstart recipes
run with `--set model.head=atss`."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_trainer import _flat, recipe_on_synthetic_overrides

from pgd_deploy.config import TrainJob, load_config
from pgd_deploy.trainer import fit

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("atss_r101_3x_ms_coco", "atss_r50_1x_coco", "pgd_atss_r101_r50_1x_coco")
# The official ATSS configs already use GIoU, NMS 0.6 and the product threshold: only these differ.
SWITCHES = {"data.filter_empty": True, "data.min_box_size": 1.0, "train.amp": "off"}


def test_atss_recipes_and_their_official_variants():
    for name in NAMES:
        official = _flat(load_config(TrainJob, ROOT / "train" / f"{name}_official.toml"))
        recommended = _flat(load_config(TrainJob, ROOT / "train" / f"{name}.toml"))
        assert recommended["model.head"] == official["model.head"] == "atss", name
        differ = {k for k in official if official[k] != recommended[k]}
        extra = {"distill.teacher", "distill.teacher_score"} if name.startswith("pgd") else set()
        assert differ == set(SWITCHES) | extra | {"train.work_dir"}, name
        assert {k: official[k] for k in SWITCHES} == SWITCHES, name
    assert official["distill.teacher_score"] == "class"  # D16: the official code's score
    pgd = _flat(load_config(TrainJob, ROOT / "train" / "pgd_atss_r101_r50_1x_coco.toml"))
    assert (pgd["distill.topk"], pgd["distill.alpha"]) == (9, 0.08)  # ATSS's, not FCOS's 30, 0.04
    assert (pgd["distill.beta"], pgd["distill.gamma"]) == (0.04, 0.128)
    assert pgd["distill.swap_xy"] is False  # the official anchor-based masks test (x, y)
    assert pgd["distill.teacher_score"] == "detection"  # class x IoU prediction (D16)


def test_the_official_atss_recipes_run_on_the_synthetic_data(tmp_path):
    small = recipe_on_synthetic_overrides(tmp_path / "cache")
    teacher = tmp_path / "teacher" / "last.pt"
    for name in NAMES:
        extra = [f"distill.teacher='{teacher}'"] if name.startswith("pgd") else []
        work_dir = tmp_path / ("teacher" if "r101_3x" in name else name)
        recipe = ROOT / "train" / f"{name}_official.toml"
        result = fit(load_config(TrainJob, recipe, small + extra), work_dir=work_dir)
        assert result.completed and result.iterations == 2 and "AP" in result.metrics, name


def test_the_quickstart_recipes_run_with_model_head_atss(tmp_path):
    small = [*recipe_on_synthetic_overrides(tmp_path / "cache"), "model.head='atss'"]
    runs = {}
    for stage in ("teacher", "student", "pgd"):
        extra = [f"distill.teacher='{runs['teacher']}'"] if stage == "pgd" else []
        recipe = ROOT / "train" / f"quickstart_{stage}.toml"
        result = fit(load_config(TrainJob, recipe, small + extra), work_dir=tmp_path / stage)
        assert result.completed and "AP" in result.metrics, stage
        runs[stage] = tmp_path / stage / "last.pt"
        saved = _flat(load_config(TrainJob, tmp_path / stage / "config.toml"))
        assert saved["model.head"] == "atss"
    # the recipes leave K and the weights to the head: ATSS's, not the FCOS defaults
    assert (saved["distill.topk"], saved["distill.alpha"], saved["distill.gamma"]) == (
        9,
        0.08,
        0.128,
    )
    assert saved["distill.teacher_score"] == "detection"
