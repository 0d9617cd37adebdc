"""Config: defaults in one place, TOML recipes, strict --set overrides, lossless save/load."""

from __future__ import annotations

import pytest

from pgd_deploy.config import (
    ExportJob,
    ModelConfig,
    TrainJob,
    dumps_toml,
    from_dict,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
)


def test_defaults_match_the_pgd_recipe():
    cfg = TrainJob()
    assert cfg.model.depth == 50 and cfg.model.fpn_channels == 256
    assert cfg.distill.level_weights == (1.0, 1.25, 1.5, 1.75, 2.0)
    assert cfg.distill.mask_group == 4
    assert cfg.train.base_lr == 0.02 and cfg.train.base_batch == 32


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[model]\ndepth = 101\n[train]\nlr_steps = [24, 33]\n")
    cfg = load_config(TrainJob, recipe, ["model.depth=50", "train.max_iters=100"])
    assert cfg.model.depth == 50  # --set wins over the recipe
    assert cfg.train.lr_steps == (24.0, 33.0)  # ints accepted for floats, stored as a tuple
    assert cfg.train.max_iters == 100
    assert cfg.data == TrainJob().data  # untouched sections keep their defaults


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("model.dept=50", "unknown config key 'model.dept'"),
        ("modle.depth=50", "unknown config key 'modle'"),
        ("model.depth=fifty", "config key 'model.depth': expected int"),
        ("model.depth=50.5", "config key 'model.depth': expected int"),
        ("train.deterministic=1", "config key 'train.deterministic': expected bool"),
        ("train.amp=fp8", "config key 'train.amp': expected 'auto' | 'bf16' | 'fp16' | 'off'"),
        ("data.multiscale=[480, 'x']", "config key 'data.multiscale': expected list of int"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ValueError, match=fragment.replace("|", r"\|").replace("(", r"\(")):
        load_config(TrainJob, None, [override])


def test_bad_recipe_names_file_and_key(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[train]\nbatch_sizes = 4\n")
    with pytest.raises(ValueError, match=r"bad\.toml: unknown config key 'train\.batch_sizes'"):
        load_config(TrainJob, recipe)
    recipe.write_text("[train\n")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_config(TrainJob, recipe)
    with pytest.raises(FileNotFoundError):
        load_config(TrainJob, tmp_path / "missing.toml")


def test_override_syntax_errors():
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["model.depth"])
    assert parse_overrides(["data.root=/data/coco"]) == {"data": {"root": "/data/coco"}}


def test_optional_and_table_fields():
    cfg = load_config(
        TrainJob, None, ["distill.mask_group=none", "train.loss_weights={loss_box=2}"]
    )
    assert cfg.distill.mask_group is None
    assert cfg.train.loss_weights == {"loss_box": 2.0}


@pytest.mark.parametrize("job", [TrainJob, ExportJob])
def test_save_load_round_trip(tmp_path, job):
    cfg = load_config(job, None, [])
    if job is TrainJob:
        cfg = load_config(job, None, ["distill.mask_group=none", "data.multiscale=[480, 960]"])
    path = save_config(cfg, tmp_path / "config.toml")
    assert load_config(job, path) == cfg
    assert "[" in dumps_toml(cfg)


def test_from_dict_rejects_unknown_sections():
    with pytest.raises(ValueError, match="unknown config key 'trian'"):
        from_dict(TrainJob, {"trian": {}})


def test_a_head_brings_its_pgd_defaults_beneath_what_the_user_wrote(tmp_path):
    from pgd_deploy.models.build import HEADS

    fcos = load_config(TrainJob).distill
    assert (fcos.topk, fcos.alpha, fcos.teacher_score) == (30, 0.04, "class")  # the section's
    atss = load_config(TrainJob, None, ["model.head='atss'"]).distill
    assert (atss.topk, atss.alpha, atss.beta, atss.gamma) == (9, 0.08, 0.04, 0.128)
    assert atss.teacher_score == "detection" and atss.delta == fcos.delta  # the rest: the section's
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nhead = "atss"\n[distill]\ntopk = 12\n')
    mine = load_config(TrainJob, recipe, ["distill.alpha=0.01"]).distill
    assert (mine.topk, mine.alpha, mine.gamma) == (12, 0.01, 0.128)  # recipe and --set win
    base = to_dict(TrainJob(model=ModelConfig(head="atss")))  # a checkpoint's full config
    assert load_config(TrainJob, None, base=base).distill.topk == 30  # what it was trained with
    with pytest.raises(ValueError, match=r"model.head 'yolo'.*expected one of \['atss', 'fcos'"):
        load_config(TrainJob, None, ["model.head='yolo'"])
    with pytest.raises(ValueError, match="model.head"):  # a wrong type: the type check says so
        load_config(TrainJob, None, ["model.head=3"])
    for name, cls in HEADS.items():  # every head's defaults are valid distill keys and values
        section = from_dict(TrainJob, {"distill": dict(cls.pgd_defaults)}, name).distill
        assert {k: getattr(section, k) for k in cls.pgd_defaults} == dict(cls.pgd_defaults)
