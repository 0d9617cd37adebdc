"""Training engine: loss weights, non-finite losses and gradients, channels_last, work folders
that already hold a run, the recipes, and `pgd-train eval` of a trained checkpoint. Exact resume
is in test_trainer_resume.py, unreadable images in test_trainer_unreadable.py, DDP in
test_trainer_ddp.py, checkpoint file safety in test_checkpoint_safety.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Interrupt and InterruptAt are unused here: test_anchor_heads, test_gpu and test_qat import them
# from this module, as test_toy_head imports tiny_overrides and test_head_recipes the recipe helpers
from _trainer_helpers import ROOT, Interrupt, InterruptAt, tiny_cfg, tiny_overrides  # noqa: F401

from pgd_deploy.checkpoint import load_checkpoint
from pgd_deploy.config import TrainJob, load_config
from pgd_deploy.trainer import fit

# these tests run the training kernels: `make test-isa` runs them all
pytestmark = pytest.mark.trained


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path / "cache", "train.max_iters=6", "train.checkpoint_every=2")

    class NaNAt:
        calls = 0

        def __call__(self, images, outputs, targets):
            NaNAt.calls += 1
            value = float("nan") if NaNAt.calls == 3 else 0.0
            return {"loss_injected": outputs.cls_logits[0].sum() * 0 + value}

    result = fit(cfg, work_dir=tmp_path / "run", make_loss_provider=lambda m, d: NaNAt())
    assert not result.completed
    assert "non-finite loss" in result.message and "loss_injected" in result.message
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    last = tmp_path / "run" / "last.pt"
    assert f"The last good checkpoint is {last} (iteration 2)" in result.message
    NaNAt.calls = 2  # the next run's first step is not finite: no checkpoint to name
    cfg = tiny_cfg(tmp_path / "cache", "train.max_iters=6")
    early = fit(cfg, work_dir=tmp_path / "early", make_loss_provider=lambda m, d: NaNAt())
    assert not early.completed and not (tmp_path / "early" / "last.pt").exists()
    assert "No checkpoint was written before it" in early.message, early.message


def test_non_finite_gradient_stops_before_the_update(tmp_path):
    cfg = tiny_cfg(tmp_path / "cache", "train.max_iters=6", "train.checkpoint_every=2")

    class NaNGradAt:
        calls = 0

        def __call__(self, images, outputs, targets):
            NaNGradAt.calls += 1
            term = outputs.cls_logits[0].sum() * 0  # finite value...
            if NaNGradAt.calls == 3:
                term.register_hook(lambda grad: grad * float("nan"))  # ...NaN gradient
            return {"loss_injected": term}

    result = fit(cfg, work_dir=tmp_path / "run", make_loss_provider=lambda m, d: NaNGradAt())
    assert not result.completed and "non-finite gradients" in result.message
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    last = tmp_path / "run" / "last.pt"
    assert f"The last good checkpoint is {last} (iteration 2)" in result.message


def test_provider_weights_times_train_weights_are_applied_once_and_logged_unweighted(tmp_path):
    """A loss provider's `loss_weights` (as the distiller's) and train.loss_weights multiply; the
    engine applies the product once; the log keeps every term unweighted, plus the total."""

    class Weighted:
        loss_weights = {"loss_extra": 3.0}

        def __call__(self, images, outputs, targets):
            return {"loss_extra": outputs.cls_logits[0].sum() * 0 + 1.5}

    cfg = tiny_cfg(
        tmp_path / "cache",
        "train.max_iters=1",
        "train.loss_weights={loss_extra = 2.0, loss_cls = 0.5}",
    )
    result = fit(cfg, work_dir=tmp_path / "run", make_loss_provider=lambda m, d: Weighted())
    assert result.completed
    row = load_checkpoint(tmp_path / "run" / "last.pt")["history"][0]
    assert row["loss_extra"] == 1.5  # unweighted
    expected = 0.5 * row["loss_cls"] + row["loss_box"] + row["loss_ctr"] + 6.0 * 1.5
    assert row["loss"] == pytest.approx(expected, rel=1e-6)


def test_a_misspelt_loss_weight_is_refused_naming_the_losses(tmp_path):
    """train.loss_weights={loss_bbox = 2} (mmdetection's name for loss_box) would weigh nothing."""
    cfg = tiny_cfg(tmp_path / "cache", "train.max_iters=1", "train.loss_weights={loss_bbox = 2.0}")
    with pytest.raises(ValueError, match="no loss named loss_bbox.*loss_box, loss_cls, loss_ctr"):
        fit(cfg, work_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_channels_last_setting_and_training(tmp_path):
    from pgd_deploy.devices import memory_format_for

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert memory_format_for("auto", cpu) == torch.contiguous_format
    assert memory_format_for("auto", cuda) == torch.channels_last
    assert memory_format_for("off", cuda) == torch.contiguous_format
    assert memory_format_for("on", cpu) == torch.channels_last
    cfg = tiny_cfg(tmp_path / "cache", "train.max_iters=2", "train.channels_last='on'")
    result = fit(cfg, work_dir=tmp_path / "run")
    assert result.completed and result.iterations == 2
    with pytest.raises(ValueError, match="train.channels_last"):
        tiny_cfg(tmp_path / "cache", "train.channels_last='yes'")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_work_dir_holding_a_run_is_never_silently_replaced(tmp_path, capsys):
    from pgd_deploy.cli import train_main

    cache, run = tmp_path / "cache", tmp_path / "run"
    first = fit(tiny_cfg(cache, "train.max_iters=2"), work_dir=run)
    assert first.completed
    names = ("last.pt", "best.pt", "metrics.json", "curves.png", "config.toml")
    before = {name: (run / name).read_bytes() for name in names}

    def unchanged() -> bool:
        return {name: (run / name).read_bytes() for name in names} == before

    # fit into it again: refused (it used to replace last.pt and best.pt silently)
    with pytest.raises(ValueError, match=r"already holds a training run \(last.pt, best.pt"):
        fit(tiny_cfg(cache, "train.max_iters=2"), work_dir=run)
    assert unchanged()
    recipe = str(ROOT / "train" / "quickstart_student.toml")
    argv = ["fit", "--recipe", recipe, "--work-dir", str(run)]
    argv += [f"--set={o}" for o in tiny_overrides(cache, "train.max_iters=2")]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert "continue it with --resume, train into a new --work-dir, or replace it with" in err
    assert unchanged()

    # resume a finished run: a no-op that says so (it used to rewrite metrics.json as {});
    # it removes what a kill -9 during a checkpoint write left behind
    leftover = run / f".last.pt.{_dead_pid()}.tmp"
    leftover.write_bytes(b"half a checkpoint")
    again = fit(tiny_cfg(cache, "train.max_iters=2"), work_dir=run, resume=True)
    assert again.completed and again.iterations == 2 and again.metrics == first.metrics
    assert "holds a finished run (iteration 2 of 2): nothing to do" in again.message
    assert unchanged() and not leftover.exists()

    # resume with another architecture: refused before anything is written
    assert train_main([*argv, "--resume", "--set", "model.depth=34"]) == 2
    err = capsys.readouterr().err
    assert (
        "cannot resume with this configuration: model.depth is 18 in the checkpoint but 34" in err
    )
    assert "Traceback" not in err and unchanged()

    # --overwrite replaces the run, leaving nothing of the old one
    replaced = fit(tiny_cfg(cache, "train.max_iters=3"), work_dir=run, overwrite=True)
    assert replaced.completed and load_checkpoint(run / "best.pt")["iteration"] == 3
    with pytest.raises(ValueError, match="choose one"):
        fit(tiny_cfg(cache, "train.max_iters=3"), work_dir=run, overwrite=True, resume=True)


# --------------------------------------------------------------------------------------------
# Recipes: the quickstart ones, and the official ones = the recommended ones + the switches
# --------------------------------------------------------------------------------------------


def test_quickstart_recipes_parse_and_smoke_run(tmp_path):
    for name in (
        "quickstart_teacher",
        "quickstart_student",
        "quickstart_pgd",
        "fcos_r101_3x_ms_coco",
        "fcos_r50_1x_coco",
        "pgd_fcos_r101_r50_1x_coco",
        "quickstart_qat",
        "qat_pgd_fcos_r50_coco",
    ):
        load_config(TrainJob, ROOT / "train" / f"{name}.toml")
    cfg = load_config(
        TrainJob,
        ROOT / "train" / "quickstart_student.toml",
        [
            "model.depth=18",
            f"data.cache_dir='{tmp_path}'",
            "data.shapes_train=16",
            "data.shapes_val=4",
            "train.max_iters=2",
            "train.batch_size=2",
        ],
    )
    result = fit(cfg, work_dir=tmp_path / "qs")
    assert result.completed and set(result.metrics) >= {"AP", "AP50"}
    assert (tmp_path / "qs" / "metrics.json").is_file()


OFFICIAL = {  # official recipe -> (recommended recipe, the keys that differ between them)
    "fcos_r101_3x_ms_coco": set(),
    "fcos_r50_1x_coco": set(),
    "pgd_fcos_r101_r50_1x_coco": {"distill.teacher", "distill.swap_xy"},
}


OFFICIAL_SWITCHES = {
    "model.box_loss": "iou",
    "model.nms_thresh": 0.5,
    "model.score_before_centerness": True,
    "data.filter_empty": True,
    "data.min_box_size": 1.0,
    "train.amp": "off",
}


def _flat(cfg: TrainJob) -> dict[str, object]:
    from pgd_deploy.config import to_dict

    return {f"{s}.{k}": v for s, section in to_dict(cfg).items() for k, v in section.items()}


def test_official_recipes_are_the_recommended_ones_plus_the_switches():
    for name, extra in OFFICIAL.items():
        official = _flat(load_config(TrainJob, ROOT / "train" / f"{name}_official.toml"))
        recommended = _flat(load_config(TrainJob, ROOT / "train" / f"{name}.toml"))
        differ = {k for k in official if official[k] != recommended[k]}
        assert differ == set(OFFICIAL_SWITCHES) | extra | {"train.work_dir"}, name
        assert {k: official[k] for k in OFFICIAL_SWITCHES} == OFFICIAL_SWITCHES, name
    pgd = _flat(load_config(TrainJob, ROOT / "train" / "pgd_fcos_r101_r50_1x_coco_official.toml"))
    assert pgd["distill.swap_xy"] is True
    assert pgd["distill.teacher"] == "runs/fcos_r101_3x_ms_coco_official/last.pt"


def recipe_on_synthetic_overrides(cache: Path) -> list[str]:
    """`--set` overrides that run any COCO recipe for two iterations on 64 px synthetic shapes
    (R18, no ImageNet weights, single scale)."""
    return [
        "model.depth=18",
        "model.weights='none'",
        "model.fpn_channels=64",
        "data.root=''",
        f"data.cache_dir='{cache}'",
        "data.shapes_train=8",
        "data.shapes_val=4",
        "data.shapes_size=64",
        "data.min_size=64",
        "data.max_size=64",
        "data.multiscale=[]",
        "data.workers=0",
        "train.max_iters=2",
        "train.batch_size=2",
        "train.device='cpu'",
    ]


def test_official_recipes_run_on_the_synthetic_data(tmp_path):
    small = recipe_on_synthetic_overrides(tmp_path / "cache")
    runs = {}
    for name, extra in (
        ("fcos_r101_3x_ms_coco", []),
        ("fcos_r50_1x_coco", []),
        ("pgd_fcos_r101_r50_1x_coco", [f"distill.teacher='{tmp_path / 'teacher' / 'last.pt'}'"]),
    ):
        recipe = ROOT / "train" / f"{name}_official.toml"
        work_dir = tmp_path / ("teacher" if name.startswith("fcos_r101") else name)
        result = fit(load_config(TrainJob, recipe, small + extra), work_dir=work_dir)
        assert result.completed and result.iterations == 2 and "AP" in result.metrics, name
        runs[name] = _flat(load_config(TrainJob, work_dir / "config.toml"))
    for name, cfg in runs.items():
        assert {k: cfg[k] for k in OFFICIAL_SWITCHES} == OFFICIAL_SWITCHES, name
    assert runs["pgd_fcos_r101_r50_1x_coco"]["distill.swap_xy"] is True


def test_pgd_train_eval_checkpoint_reproduces_the_training_metrics(trained_run, tmp_path):
    """`pgd-train eval --checkpoint` scores a checkpoint on the validation data of its config:
    the metrics recorded at the end of training, exactly; `--set` points it elsewhere."""
    import json

    ckpt = trained_run["checkpoint"]
    recorded = load_checkpoint(ckpt)["metrics"]
    assert recorded["AP50"] > 0.1  # a model that detects: the comparison is not 0 == 0

    def pgd_train_eval(*extra: str) -> dict[str, float]:
        out = tmp_path / f"metrics{len(extra)}.json"
        cmd = [sys.executable, "-m", "pgd_deploy.cli", "eval", "--checkpoint", str(ckpt)]
        proc = subprocess.run(
            [*cmd, "--device", "cpu", "--json", str(out), *extra],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "AP50" in proc.stdout
        return json.loads(out.read_text())

    assert pgd_train_eval() == recorded
    on_train = pgd_train_eval(
        "--set", "data.val_ann='annotations/train.json'", "--set", "data.val_images='train'"
    )
    assert on_train["AP"] != recorded["AP"]  # 64 training images, not the 16 validation ones
