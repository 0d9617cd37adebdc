"""The quickstart job behind `make demo`: three trainings, a scoreboard, reuse on re-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgd_deploy.config import TrainJob, load_config
from pgd_deploy.demo import run_demo
from pgd_deploy.trainer import fit

ROOT = Path(__file__).resolve().parents[1]


def _stop_at_second_step(student, device):
    calls = []

    def provider(images, outputs, targets):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("the demo was stopped")
        return {}

    return provider


def test_demo_writes_the_scoreboard_and_reuses_finished_runs(tmp_path, caplog):
    overrides = [
        "model.depth=18",
        "model.fpn_channels=64",
        f"data.cache_dir='{tmp_path / 'cache'}'",
        "data.shapes_train=16",
        "data.shapes_val=4",
        "data.shapes_size=64",
        "data.min_size=64",
        "data.max_size=64",
        "train.max_iters=2",
        "train.batch_size=2",
        "train.warmup_iters=1",
        "train.checkpoint_every=1",
    ]
    work = tmp_path / "demo"
    rows = run_demo(work, overrides=overrides, recipes=ROOT / "train")
    board = json.loads((work / "scoreboard.json").read_text())
    assert board == rows
    assert [r["name"] for r in board] == ["teacher", "student", "pgd"]
    for row in board:
        assert {"name", "AP", "AP50", "params", "cpu_ms_per_image", "train_iters", "seed"} <= set(
            row
        )
        assert 0.0 <= row["AP"] <= 1.0 and row["cpu_ms_per_image"] > 0 and row["params"] > 1e6
    assert board[1]["train_iters"] == board[2]["train_iters"] == 2  # same budget for both students
    pgd_config = (work / "pgd" / "config.toml").read_text()
    assert f'teacher = "{work / "teacher" / "best.pt"}"' in pgd_config
    caplog.clear()
    with caplog.at_level("INFO", logger="pgd_deploy.demo"):
        run_demo(work, overrides=overrides, recipes=ROOT / "train")
    assert caplog.text.count("reusing the finished run") == 3

    # A demo stopped while training the student leaves an unfinished run in its stage folder:
    # the next demo continues it (fit would refuse to train over it).
    student = load_config(TrainJob, ROOT / "train" / "quickstart_student.toml", overrides)
    with pytest.raises(KeyboardInterrupt):
        fit(
            student,
            work_dir=work / "student",
            overwrite=True,
            make_loss_provider=_stop_at_second_step,
        )
    assert not (work / "student" / "best.pt").exists()
    caplog.clear()
    with caplog.at_level("INFO", logger="pgd_deploy.demo"):
        rows = run_demo(work, overrides=overrides, recipes=ROOT / "train")
    assert caplog.text.count("reusing the finished run") == 2
    assert "student: continuing the unfinished run" in caplog.text
    assert rows[1]["train_iters"] == 2 and (work / "student" / "metrics.json").is_file()
