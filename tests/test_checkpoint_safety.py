"""Checkpoint files as training writes them and every loader reads them: atomic writes, clear
errors for truncated or foreign files, and files holding code refused by every loader, unpickled
by none. (The file format itself is tested in test_checkpoint.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pgd_deploy.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

# marked as the training tests they were split from: `make test-isa` runs them too
pytestmark = pytest.mark.trained


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
