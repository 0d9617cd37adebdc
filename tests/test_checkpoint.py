"""Tests of pgd_deploy.checkpoint: the file format only (the detector is built in models/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pgd_deploy.checkpoint import (
    CheckpointError,
    is_checkpoint,
    load_checkpoint,
    save_checkpoint,
    validate_checkpoint,
)


def test_the_format_module_does_not_import_the_models() -> None:
    code = (
        "import sys, pgd_deploy.checkpoint\n"
        "print(sorted(m for m in sys.modules if m.startswith('pgd_deploy.models')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_round_trip_and_validation(tmp_path: Path) -> None:
    path = save_checkpoint({"model": {"w": torch.ones(2)}, "config": {}}, tmp_path / "c.pt")
    state = load_checkpoint(path)
    assert is_checkpoint(state) and torch.equal(state["model"]["w"], torch.ones(2))
    assert not is_checkpoint({"model": {}}) and not is_checkpoint([1])
    with pytest.raises(CheckpointError, match="x.pt: not a pgd-deploy checkpoint"):
        validate_checkpoint({"model": {}, "config": {}}, "x.pt")
    with pytest.raises(CheckpointError, match="x.pt: checkpoint has no 'config' entry"):
        validate_checkpoint({"format": "pgd-deploy-checkpoint", "model": {}}, "x.pt")
