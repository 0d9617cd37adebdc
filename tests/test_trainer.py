"""Training engine: exact resume, non-finite loss handling, atomic checkpoints, DDP, recipes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pgd_deploy.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from pgd_deploy.config import TrainJob, load_config
from pgd_deploy.trainer import fit

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(cache: Path, *extra: str) -> TrainJob:
    """R18 with a 64-channel FPN on 64 px synthetic images: seconds per run on a CPU."""
    return load_config(
        TrainJob,
        None,
        [
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
        ],
    )


class Interrupt:
    """A loss provider that contributes nothing and stops the run at a given step."""

    def __init__(self, at: int, error: type[BaseException] = KeyboardInterrupt) -> None:
        self.at, self.calls, self.error = at, 0, error

    def __call__(self, images, outputs, targets):
        self.calls += 1
        if self.calls == self.at:
            raise self.error("interrupted by the test")
        return {}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_resume_is_exact(tmp_path):
    # 4 batches per epoch; 6 iterations cross an epoch boundary; the interruption is mid-epoch
    cfg = tiny_cfg(tmp_path / "cache", "train.max_iters=6", "train.checkpoint_every=3")
    straight = fit(cfg, work_dir=tmp_path / "a")
    assert straight.completed and straight.iterations == 6
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, work_dir=tmp_path / "b", make_loss_provider=lambda m, d: Interrupt(at=4))
    assert load_checkpoint(tmp_path / "b" / "last.pt")["iteration"] == 3
    resumed = fit(cfg, work_dir=tmp_path / "b", resume=True)
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
    model, cfg, state = load_model(work / "last.pt")
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


def test_channels_last_setting_and_training(tmp_path):
    from pgd_deploy.trainer import memory_format_for

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
    from pgd_deploy.distill.distiller import load_teacher
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
