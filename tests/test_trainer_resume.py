"""Exact resume (issue 16): a run interrupted mid-epoch and resumed ends with the weights of an
uninterrupted one, bit for bit, with the global random streams and (PGD) the mask-jitter
generator restored. The resume across skipped batches is in test_trainer_unreadable.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _trainer_helpers import (
    Interrupt,
    InterruptAt,
    assert_same_weights,
    checkpoint_weights,
    tiny_cfg,
)

from pgd_deploy.checkpoint import load_checkpoint, save_checkpoint
from pgd_deploy.config import TrainJob
from pgd_deploy.trainer import fit

# exact resume runs the training kernels: `make test-isa` runs these
pytestmark = pytest.mark.trained


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
    a, b = (
        checkpoint_weights(tmp_path / "a" / "last.pt"),
        checkpoint_weights(tmp_path / "b" / "last.pt"),
    )
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for name in ("best.pt", "config.toml", "metrics.json", "curves.png"):
        assert (tmp_path / "b" / name).is_file()


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
    assert_same_weights(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    # the jitter has its own generator, saved in the checkpoint (a CPU byte tensor)
    assert state["loss_provider"]["generator"].dtype == torch.uint8
