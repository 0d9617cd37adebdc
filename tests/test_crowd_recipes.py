"""The CrowdHuman recipes (issue 41): the paper's CrowdHuman settings for every head, and each
recipe runs on the synthetic crowd with the crowd metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_trainer import _flat, recipe_on_synthetic_overrides

from pgd_deploy.config import TrainJob, load_config
from pgd_deploy.trainer import fit

ROOT = Path(__file__).resolve().parents[1]
HEADS = ("fcos", "atss", "gfl")
# every CrowdHuman recipe: one class of full-body boxes at 1400 x 800, 500 detections, NMS 0.6,
# 2 images x 8 GPUs at lr 0.01, scored by MR^-2 / AP / JI
CROWD = {
    "data.metric": "crowd",
    "data.min_size": 800,
    "data.max_size": 1400,
    "data.train_images": "Images",
    "data.val_images": "Images_val",
    "model.max_detections": 500,
    "model.nms_thresh": 0.6,
    "train.batch_size": 2,
    "train.base_lr": 0.01,
    "train.base_batch": 16,
}
PGD = {"distill.alpha": 0.001, "distill.beta": 0.0005, "distill.gamma": 0.0016}


def _recipes(head: str) -> dict[str, dict]:
    return {
        stage: _flat(load_config(TrainJob, ROOT / "train" / f"{name}.toml"))
        for stage, name in (
            ("teacher", f"{head}_r101_3x_ms_crowdhuman"),
            ("student", f"{head}_r50_1x_crowdhuman"),
            ("pgd", f"pgd_{head}_r101_r50_1x_crowdhuman"),
        )
    }


@pytest.mark.parametrize("head", HEADS)
def test_the_crowdhuman_recipes_carry_the_papers_settings(head):
    recipes = _recipes(head)
    for stage, flat in recipes.items():
        assert {k: flat[k] for k in CROWD} == CROWD, stage
        assert flat["model.head"] == head and flat["model.num_classes"] == 0  # 1, from the data
    teacher, student, pgd = recipes["teacher"], recipes["student"], recipes["pgd"]
    assert (teacher["model.depth"], teacher["train.epochs"], teacher["train.lr_steps"]) == (
        101, 36, [24.0, 33.0]
    )  # fmt: skip
    assert teacher["data.multiscale"] == [480, 960] and teacher["train.grad_clip"] == 0.0
    for flat in (student, pgd):
        assert (flat["model.depth"], flat["train.epochs"], flat["train.lr_steps"]) == (
            50, 12, [8.0, 11.0]
        )  # fmt: skip
        assert flat["data.multiscale"] == [] and flat["train.grad_clip"] == 35.0
    assert {k: pgd[k] for k in PGD} == PGD  # the official CrowdHuman weights, not COCO's
    assert pgd["distill.mask_group"] == 2 and pgd["distill.delta"] == 0.0008
    assert pgd["distill.teacher"] == f"runs/{head}_r101_3x_ms_crowdhuman/best.pt"
    # what the head's COCO PGD recipe sets beyond the weights (K, the teacher score) carries over
    coco = _flat(load_config(TrainJob, ROOT / "train" / f"pgd_{head}_r101_r50_1x_coco.toml"))
    for key in ("distill.topk", "distill.teacher_score", "distill.temperature", "distill.xi_cls"):
        assert pgd[key] == coco[key], key


@pytest.mark.slow
@pytest.mark.parametrize("head", HEADS)
def test_the_crowdhuman_recipes_run_on_the_synthetic_crowd(tmp_path, head):
    small = [*recipe_on_synthetic_overrides(tmp_path / "cache"), "data.shapes_crowd=true"]
    small += ["data.shapes_train=6", "data.shapes_val=4"]
    teacher = tmp_path / "teacher" / "last.pt"
    for stage, name in (
        ("teacher", f"{head}_r101_3x_ms_crowdhuman"),
        ("student", f"{head}_r50_1x_crowdhuman"),
        ("pgd", f"pgd_{head}_r101_r50_1x_crowdhuman"),
    ):
        extra = [f"distill.teacher='{teacher}'"] if stage == "pgd" else []
        cfg = load_config(TrainJob, ROOT / "train" / f"{name}.toml", small + extra)
        result = fit(cfg, work_dir=tmp_path / stage)
        assert result.completed and result.iterations == 2, name
        assert set(result.metrics) == {"MR2", "AP", "JI"}, name
        assert 0.0 <= result.metrics["MR2"] <= 1.0
