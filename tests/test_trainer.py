"""Training engine: exact resume, non-finite loss handling, atomic checkpoints, DDP, recipes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pgd_deploy.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pgd_deploy.config import TrainJob, load_config
from pgd_deploy.data.shapes import ShapesSpec, generate_shapes
from pgd_deploy.models import load_detector
from pgd_deploy.trainer import fit

ROOT = Path(__file__).resolve().parents[1]
# exact resume, DDP and the recipes all run the training kernels: `make test-isa` runs them all
pytestmark = pytest.mark.trained


def tiny_overrides(cache: Path, *extra: str) -> list[str]:
    """R18 with a 64-channel FPN on 64 px synthetic images: seconds per run on a CPU."""
    return [
        "model.depth=18",
        "model.fpn_channels=64",
        f"data.cache_dir='{cache}'",
        "data.shapes_train=8",
        "data.shapes_val=4",
        "data.shapes_size=64",
        "data.min_size=64",
        "data.max_size=64",
        "data.workers=0",
        "train.batch_size=2",
        "train.base_lr=0.01",
        "train.base_batch=8",
        "train.warmup_iters=2",
        "train.device='cpu'",
        "train.log_every=1",
        "train.deterministic=true",
        *extra,
    ]


def tiny_cfg(cache: Path, *extra: str) -> TrainJob:
    return load_config(TrainJob, None, tiny_overrides(cache, *extra))


def shapes_with_unreadable(
    folder: Path, *, train: int = 8, bad_train: tuple[str, ...] = (), bad_val: tuple[str, ...] = ()
) -> tuple[Path, list[str]]:
    """A synthetic dataset (64 px, 4 val images) with some images truncated; returns its root
    and the `--set` overrides that train on it."""
    root = generate_shapes(folder, train=train, val=4, seed=0, spec=ShapesSpec(size=64))
    for split, names in (("train", bad_train), ("val", bad_val)):
        for name in names:
            truncate(root / split / name)
    overrides = [
        f"data.root='{root}'",
        "data.train_images='train'",
        "data.train_ann='annotations/train.json'",
        "data.val_images='val'",
        "data.val_ann='annotations/val.json'",
    ]
    return root, overrides


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: min(200, len(data) // 3)])


class Interrupt:
    """A loss provider that stops the run at call `at` (never when 0) and otherwise adds a
    stochastic term drawn from the global torch, numpy and Python random streams, as dropout or
    a random augmentation would: a resume that does not restore all three changes the weights."""

    def __init__(self, at: int = 0, error: type[BaseException] = KeyboardInterrupt) -> None:
        self.at, self.calls, self.error = at, 0, error

    def __call__(self, images, outputs, targets):
        self.calls += 1
        if self.calls == self.at:
            raise self.error("interrupted by the test")
        noise = torch.rand(()).item() + random.random() + float(np.random.rand())
        return {"loss_noise": outputs.cls_logits[0].mean() * noise}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_resume_is_exact(tmp_path):
    # 4 batches per epoch; 6 iterations cross an epoch boundary; the interruption is mid-epoch
    cfg = tiny_cfg(tmp_path / "cache", "train.max_iters=6", "train.checkpoint_every=3")
    straight = fit(cfg, work_dir=tmp_path / "a", make_loss_provider=lambda m, d: Interrupt())
    assert straight.completed and straight.iterations == 6
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, work_dir=tmp_path / "b", make_loss_provider=lambda m, d: Interrupt(at=4))
    assert load_checkpoint(tmp_path / "b" / "last.pt")["iteration"] == 3
    resumed = fit(
        cfg, work_dir=tmp_path / "b", resume=True, make_loss_provider=lambda m, d: Interrupt()
    )
    assert resumed.completed and resumed.iterations == 6
    a, b = _weights(tmp_path / "a" / "last.pt"), _weights(tmp_path / "b" / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for name in ("best.pt", "config.toml", "metrics.json", "curves.png"):
        assert (tmp_path / "b" / name).is_file()


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


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, path)
    real_save = torch.save

    def crash(obj, fh, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, fh)
        raise OSError("disk full (simulated crash)")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {}}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def test_truncated_or_foreign_checkpoints_are_clear_errors(tmp_path):
    path = tmp_path / "x.pt"
    save_checkpoint({"model": {}, "config": {}}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    torch.save({"weight": torch.ones(1)}, path)
    with pytest.raises(CheckpointError, match="not a pgd-deploy checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path):
    work = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    overrides = [
        "model.depth=18",
        "model.fpn_channels=64",
        f"data.cache_dir='{tmp_path / 'cache'}'",
        "data.shapes_train=8",
        "data.shapes_val=4",
        "data.shapes_size=64",
        "data.min_size=64",
        "data.max_size=64",
        "data.workers=0",
        "train.batch_size=2",
        "train.max_iters=3",
        "train.device='cpu'",
        "train.warmup_iters=1",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "pgd_deploy.cli",
        "fit",
        "--recipe",
        str(ROOT / "train" / "quickstart_student.toml"),
        "--work-dir",
        str(work),
    ]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    loaded = load_detector(work / "last.pt", device="cpu")
    state, cfg = loaded.checkpoint, loaded.config
    assert state["iteration"] == 3 and cfg.model.depth == 18
    assert state["config"]["train"]["batch_size"] == 2
    assert sorted(p.name for p in work.glob("*.pt")) == ["best.pt", "last.pt"]  # rank 0 only


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


class _CodeInPickle:
    """Unpickling this would run a shell command (it must never be unpickled)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_files_holding_code_are_refused_as_such_everywhere(tmp_path):
    from pgd_deploy.checkpoint import UnsafeFileError
    from pgd_deploy.distill.teacher import load_teacher
    from pgd_deploy.models.backbone import build_backbone

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "pgd-deploy-checkpoint", "model": _CodeInPickle(marker)}, evil)
    loaders = {
        "checkpoint": lambda: load_checkpoint(evil),  # resume, eval, export and serve go here
        "teacher": lambda: load_teacher(evil, device="cpu"),
        "backbone weights": lambda: build_backbone(depth=18, weights=str(evil)),
    }
    for where, load in loaders.items():
        with pytest.raises(UnsafeFileError) as info:
            load()
        message = str(info.value)
        assert message.startswith(f"{evil}: refused because the file holds code"), where
        assert "posix.system" in message and "will not execute" in message, where
        assert "weights_only=False" not in message and "corrupt" not in message, where
    proc = subprocess.run(
        [sys.executable, "-m", "pgd_deploy.cli", "eval", "--checkpoint", str(evil)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "refused because the file holds code" in proc.stderr
    assert "Traceback" not in proc.stderr and "weights_only" not in proc.stderr
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# unreadable images, runs that cannot finish, and work folders that already hold a run
# --------------------------------------------------------------------------------------------

BAD_TRAIN = ("000002.jpg", "000005.jpg")


@pytest.fixture(scope="module")
def run_with_unreadable(tmp_path_factory) -> dict:
    """12 iterations at batch size 1 on 8 training images of which 2 are unreadable: 6 steps
    per epoch, so the run needs two epochs."""
    import logging

    base = tmp_path_factory.mktemp("unreadable")
    root, data = shapes_with_unreadable(base / "shapes", bad_train=BAD_TRAIN)
    extra = [*data, "train.batch_size=1", "train.max_iters=12", "train.checkpoint_every=4"]
    cfg = tiny_cfg(base / "cache", *extra, "train.eval_every=0")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("pgd_deploy").addHandler(handler)
    try:
        result = fit(cfg, work_dir=base / "run")
    finally:
        logging.getLogger("pgd_deploy").removeHandler(handler)
    return {"cfg": cfg, "root": root, "base": base, "result": result, "records": records}


def test_unreadable_training_images_never_end_training_early(run_with_unreadable):
    result = run_with_unreadable["result"]
    work = run_with_unreadable["base"] / "run"
    # It used to stop after the first epoch (6 of 12 iterations) with no best.pt and
    # metrics.json == {}, and exit 0.
    assert result.completed and result.iterations == 12, result
    assert load_checkpoint(work / "last.pt")["iteration"] == 12
    assert (work / "best.pt").is_file()
    assert set(json.loads((work / "metrics.json").read_text())) >= {"AP", "AP50"}
    assert [u.split(":")[0].rsplit("/", 1)[-1] for u in result.unreadable] == list(BAD_TRAIN)
    messages = [r.getMessage() for r in run_with_unreadable["records"]]
    for name in BAD_TRAIN:  # named once, although they fail in both epochs
        named = [m for m in messages if "unreadable training image" in m and name in m]
        assert len(named) == 1, messages
    assert "2 unreadable training image(s) were skipped" in " ".join(messages)


def test_resume_after_skipped_batches_is_exact(run_with_unreadable):
    """The resume offset counts skipped batches: an interrupted run resumed from its
    mid-epoch checkpoint ends with the weights of the uninterrupted one."""
    cfg, base = run_with_unreadable["cfg"], run_with_unreadable["base"]
    # `Interrupt` also adds a term drawn from the global random streams, so the random state
    # restored on resume is checked along with the data position.
    straight = fit(cfg, work_dir=base / "a", make_loss_provider=lambda m, d: Interrupt())
    assert straight.completed and straight.iterations == 12
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, work_dir=base / "b", make_loss_provider=lambda m, d: Interrupt(at=9))
    assert load_checkpoint(base / "b" / "last.pt")["iteration"] == 8  # mid second epoch
    resumed = fit(
        cfg, work_dir=base / "b", resume=True, make_loss_provider=lambda m, d: Interrupt()
    )
    assert resumed.completed and resumed.iterations == 12
    _assert_same_weights(base / "a" / "last.pt", base / "b" / "last.pt")


def test_eval_counts_unreadable_validation_images(run_with_unreadable, tmp_path, capsys):
    import shutil

    from pgd_deploy.cli import train_main

    root = shutil.copytree(run_with_unreadable["root"], tmp_path / "copy")
    checkpoint = run_with_unreadable["base"] / "run" / "best.pt"
    argv = ["eval", "--checkpoint", str(checkpoint), "--set", f"data.root='{root}'"]
    val = sorted((root / "val").glob("*.jpg"))
    truncate(val[0])
    assert train_main(argv) == 0
    out = capsys.readouterr().out
    assert "AP50" in out and "1 of 4 images could not be read" in out and val[0].name in out
    for path in val[1:]:
        truncate(path)
    # It used to print AP 0.0 and exit 0.
    assert train_main(argv) == 1
    captured = capsys.readouterr()
    assert "AP50" not in captured.out
    assert "no metrics: validation none of the 4 images could be read" in captured.err


def test_an_epoch_without_a_readable_image_fails_the_run(tmp_path):
    from pgd_deploy.cli import train_main

    names = tuple(f"{i:06d}.jpg" for i in range(4))
    _, data = shapes_with_unreadable(tmp_path / "shapes", train=4, bad_train=names)
    overrides = tiny_overrides(tmp_path / "cache", *data, "train.max_iters=4")
    result = fit(load_config(TrainJob, None, overrides), work_dir=tmp_path / "run")
    assert not result.completed and result.iterations == 0
    assert "epoch 1: all 2 batches were skipped because none of their images" in result.message
    assert "cannot reach 4 iterations" in result.message and len(result.unreadable) == 4
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert not (tmp_path / "run" / "best.pt").exists()
    recipe = ROOT / "train" / "quickstart_student.toml"
    argv = ["fit", "--recipe", str(recipe), "--work-dir", str(tmp_path / "cli")]
    assert train_main([*argv, *(f"--set={o}" for o in overrides)]) == 1


def test_unreadable_validation_stops_the_run_and_resume_finishes_it(tmp_path):
    bad_val = tuple(f"{i:06d}.jpg" for i in range(4))
    root, data = shapes_with_unreadable(tmp_path / "shapes", bad_val=bad_val)
    cfg = tiny_cfg(tmp_path / "cache", *data, "train.max_iters=2")
    kept = {name: (tmp_path / "keep" / name) for name in bad_val}
    first = fit(cfg, work_dir=tmp_path / "run")
    assert not first.completed and "none of the 4 images could be read" in first.message
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 2  # training kept
    assert not (tmp_path / "run" / "metrics.json").exists()
    generate_shapes(tmp_path / "keep", train=8, val=4, seed=0, spec=ShapesSpec(size=64))
    for name in kept:  # the user repairs the validation images and resumes
        (root / "val" / name).write_bytes((tmp_path / "keep" / "val" / name).read_bytes())
    again = fit(cfg, work_dir=tmp_path / "run", resume=True)
    assert again.completed and again.iterations == 2 and set(again.metrics) >= {"AP"}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == again.metrics
    assert (tmp_path / "run" / "best.pt").is_file()


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
# Exact resume of a PGD run and of the global random streams (issue 16)
# --------------------------------------------------------------------------------------------


class InterruptAt:
    """Wraps a loss provider: calls it, except that call number `at` raises KeyboardInterrupt.

    Attributes (the distiller's `teacher`, `state_dict`, ...) are the wrapped provider's.
    """

    def __init__(self, inner, at: int) -> None:
        self.inner, self.at, self.calls = inner, at, 0

    def __call__(self, images, outputs, targets):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt("interrupted by the test")
        return self.inner(images, outputs, targets)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _teacher_checkpoint(path: Path) -> Path:
    """A random-weight teacher with the tiny student's head (the masks only need predictions)."""
    from pgd_deploy.config import ModelConfig, to_dict
    from pgd_deploy.models import build_detector

    torch.manual_seed(1)
    model_cfg = ModelConfig(depth=18, fpn_channels=64, num_classes=3)
    model = build_detector(model_cfg, num_classes=3)
    return save_checkpoint(
        {"model": model.state_dict(), "config": to_dict(TrainJob(model=model_cfg))}, path
    )


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    differ = [key for key in wa if not torch.equal(wa[key], wb[key])]
    assert not differ, f"{len(differ)} of {len(wa)} tensors differ, e.g. {differ[:3]}"


def test_pgd_resume_with_the_default_jitter_is_exact(tmp_path):
    """Interrupted at the 4th distillation step (mid-epoch) and resumed, a PGD run with the
    default mask jitter ends with the weights of an uninterrupted run, bit for bit."""
    from pgd_deploy.distill import build_distiller

    teacher = _teacher_checkpoint(tmp_path / "teacher.pt")
    cfg = tiny_cfg(
        tmp_path / "cache",
        "train.max_iters=6",
        "train.checkpoint_every=3",
        f"distill.teacher='{teacher}'",
        "distill.teacher_depth=18",
    )
    assert cfg.distill.jitter == 0.05  # the default, not a test setting
    assert fit(cfg, work_dir=tmp_path / "a").completed

    def interrupted(student, device):
        distiller = build_distiller(cfg.distill, student, device=device, seed=cfg.train.seed)
        return InterruptAt(distiller, at=4)

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, work_dir=tmp_path / "b", make_loss_provider=interrupted)
    state = load_checkpoint(tmp_path / "b" / "last.pt")
    assert state["iteration"] == 3
    assert fit(cfg, work_dir=tmp_path / "b", resume=True).completed
    _assert_same_weights(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    # the jitter has its own generator, saved in the checkpoint (a CPU byte tensor)
    assert state["loss_provider"]["generator"].dtype == torch.uint8


DDP_SCRIPT = """
import sys
import torch
from pgd_deploy import distributed as dist
from pgd_deploy.config import TrainJob, load_config
from pgd_deploy.trainer import fit

work, overrides = sys.argv[1], sys.argv[2:]
seen = {"batches": []}


def make_loss_provider(model, device):
    seen["model"] = model  # the detector inside the DDP wrapper, freshly initialised
    seen["initial"] = {n: p.detach().clone() for n, p in model.named_parameters()}

    def record(images, outputs, targets):
        seen["batches"].append((images.detach().cpu(), [dict(t) for t in targets]))
        return {}

    return record


assert fit(load_config(TrainJob, None, overrides), work_dir=work,
           make_loss_provider=make_loss_provider).completed
params = {n: p.detach().cpu().clone() for n, p in seen["model"].named_parameters()}
state = {"initial": seen["initial"], "params": params, "batches": seen["batches"]}
torch.save(state, f"{work}/rank{dist.rank()}.pt")
"""


@pytest.mark.slow
def test_two_process_ranks_step_together_on_different_data(tmp_path):
    """After one DDP step on different data the ranks hold identical weights (the gradients
    were averaged), which differ from a single-process step on one rank's data."""
    import dataclasses

    from pgd_deploy.data.dataset import Batch
    from pgd_deploy.engine import StepContext, train_step
    from pgd_deploy.models import build_detector
    from pgd_deploy.schedule import Schedule, build_optimizer, build_scheduler

    overrides = [
        "model.depth=18",
        "model.fpn_channels=64",
        "model.head_convs=2",
        f"data.cache_dir='{tmp_path / 'cache'}'",
        "data.shapes_train=8",
        "data.shapes_val=2",
        "data.shapes_size=64",
        "data.min_size=64",
        "data.max_size=64",
        "data.workers=0",
        "train.batch_size=2",
        "train.max_iters=1",
        "train.warmup_iters=0",
        "train.base_lr=0.02",
        "train.base_batch=4",
        "train.device='cpu'",
        "train.amp='off'",
    ]
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_SCRIPT)
    work = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    proc = subprocess.run(
        [*cmd, str(script), str(work), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rank0, rank1 = (torch.load(work / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    (images0, targets0), (images1, _) = rank0["batches"][0], rank1["batches"][0]
    assert len(rank0["batches"]) == len(rank1["batches"]) == 1
    assert not torch.equal(images0, images1)  # each rank stepped on its own images
    differ = [n for n, p in rank0["params"].items() if not torch.equal(p, rank1["params"][n])]
    assert not differ, f"ranks disagree on {len(differ)} parameters, e.g. {differ[:3]}"

    # The same step in one process, on rank 0's batch alone (same initial weights and lr).
    cfg = load_config(TrainJob, None, overrides)
    torch.manual_seed(cfg.train.seed)
    model = build_detector(dataclasses.replace(cfg.model, num_classes=3))
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(torch.equal(initial[n], p) for n, p in rank0["initial"].items())
    schedule = Schedule.from_config(cfg.train, iters_per_epoch=2, world_size=2)
    optimizer = build_optimizer(model, cfg.train, schedule.lr)
    ctx = StepContext(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, schedule),
        device=torch.device("cpu"),
    )
    train_step(ctx, Batch(images0, targets0, list(range(len(targets0))), [], []))
    solo = dict(model.named_parameters())
    moved = [n for n in initial if not torch.equal(initial[n], rank0["params"][n])]
    assert len(moved) > len(initial) // 2  # the DDP step changed the weights...
    assert any(not torch.equal(solo[n].detach(), rank0["params"][n]) for n in moved)  # ...jointly
    assert any(not torch.equal(solo[n].detach(), initial[n]) for n in initial)


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
