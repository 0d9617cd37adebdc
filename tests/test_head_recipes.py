"""The recipes of the anchor-based heads (ATSS: issue 35, GFL: issue 36): the official ones are
the recommended ones plus the official-code switches, every COCO recipe runs on the synthetic
data, and the quickstart recipes run with `--set model.head=<head>` and the head's PGD defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_trainer import _flat, recipe_on_synthetic_overrides

from pgd_deploy.config import TrainJob, load_config
from pgd_deploy.trainer import fit

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# The official ATSS and GFL configs already use GIoU, NMS 0.6 and (ATSS) the product threshold:
# only these differ, for every recipe.
SWITCHES = {"data.filter_empty": True, "data.min_box_size": 1.0, "train.amp": "off"}
# head -> the PGD recipe's own official switches (docs/method.md D16, D4) and its PGD values
PGD = {
    "atss": ({"distill.teacher_score": "class"}, {"distill.teacher_score": "detection"}, (9, 0.08)),
    "gfl": ({"distill.index_stride": True}, {"distill.index_stride": False}, (30, 0.04)),
}


def _names(head: str) -> tuple[str, ...]:
    return (f"{head}_r101_3x_ms_coco", f"{head}_r50_1x_coco", f"pgd_{head}_r101_r50_1x_coco")


@pytest.mark.parametrize("head", list(PGD))
def test_recipes_and_their_official_variants(head):
    official_pgd, recommended_pgd, (topk, alpha) = PGD[head]
    for name in _names(head):
        official = _flat(load_config(TrainJob, ROOT / "train" / f"{name}_official.toml"))
        recommended = _flat(load_config(TrainJob, ROOT / "train" / f"{name}.toml"))
        assert recommended["model.head"] == official["model.head"] == head, name
        differ = {k for k in official if official[k] != recommended[k]}
        extra = {"distill.teacher", *official_pgd} if name.startswith("pgd") else set()
        assert differ == set(SWITCHES) | extra | {"train.work_dir"}, name
        assert {k: official[k] for k in SWITCHES} == SWITCHES, name
    assert {k: official[k] for k in official_pgd} == official_pgd
    pgd = _flat(load_config(TrainJob, ROOT / "train" / f"pgd_{head}_r101_r50_1x_coco.toml"))
    assert (pgd["distill.topk"], pgd["distill.alpha"]) == (topk, alpha)  # not FCOS's 30, 0.04
    assert (pgd["distill.beta"], pgd["distill.gamma"]) == pytest.approx((alpha / 2, 1.6 * alpha))
    assert {k: pgd[k] for k in recommended_pgd} == recommended_pgd
    assert pgd["distill.swap_xy"] is False  # the official anchor-based masks test (x, y)


@pytest.mark.parametrize("head", list(PGD))
def test_the_official_recipes_run_on_the_synthetic_data(tmp_path, head):
    small = recipe_on_synthetic_overrides(tmp_path / "cache")
    teacher = tmp_path / "teacher" / "last.pt"
    for name in _names(head):
        extra = [f"distill.teacher='{teacher}'"] if name.startswith("pgd") else []
        work_dir = tmp_path / ("teacher" if "r101_3x" in name else name)
        recipe = ROOT / "train" / f"{name}_official.toml"
        result = fit(load_config(TrainJob, recipe, small + extra), work_dir=work_dir)
        assert result.completed and result.iterations == 2 and "AP" in result.metrics, name


@pytest.mark.parametrize("head", list(PGD))
def test_the_quickstart_recipes_run_with_the_head(tmp_path, head):
    small = [*recipe_on_synthetic_overrides(tmp_path / "cache"), f"model.head='{head}'"]
    runs = {}
    for stage in ("teacher", "student", "pgd"):
        extra = [f"distill.teacher='{runs['teacher']}'"] if stage == "pgd" else []
        recipe = ROOT / "train" / f"quickstart_{stage}.toml"
        result = fit(load_config(TrainJob, recipe, small + extra), work_dir=tmp_path / stage)
        assert result.completed and "AP" in result.metrics, stage
        runs[stage] = tmp_path / stage / "last.pt"
        saved = _flat(load_config(TrainJob, tmp_path / stage / "config.toml"))
        assert saved["model.head"] == head
    # the recipes leave K and the weights to the head: its values, not the section's
    _, recommended_pgd, (topk, alpha) = PGD[head]
    assert (saved["distill.topk"], saved["distill.alpha"]) == (topk, alpha)
    assert {k: saved[k] for k in recommended_pgd} == recommended_pgd
