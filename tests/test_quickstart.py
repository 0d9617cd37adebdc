"""The quickstart job behind `make demo`: a scoreboard of real APs, reuse of finished runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pgd_deploy.config import TrainJob, load_config, save_config
from pgd_deploy.devices import describe_cpu
from pgd_deploy.engine import evaluate_checkpoint
from pgd_deploy.io_utils import write_json
from pgd_deploy.quickstart import run_quickstart
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


def test_demo_scoreboard_reports_real_aps_and_reuses_finished_runs(
    trained_run, tmp_path, caplog, capsys
):
    """The teacher stage is the session's trained checkpoint, placed as a finished run (the demo
    reuses it instead of training); the two students train for 2 iterations on its data. Each
    scoreboard AP must be what its checkpoint really scores, and the PGD student, which inherits
    the detecting teacher's neck and head, must beat the baseline student."""
    overrides = [
        *trained_run["overrides"],  # its data and head: PGD needs identical taps
        "train.max_iters=2",
        "train.batch_size=2",
        "train.warmup_iters=1",
        "train.checkpoint_every=1",
    ]
    work = tmp_path / "demo"
    teacher_dir = work / "teacher"
    teacher_dir.mkdir(parents=True)
    shutil.copy(trained_run["checkpoint"], teacher_dir / "best.pt")
    save_config(
        load_config(TrainJob, ROOT / "train" / "quickstart_teacher.toml", overrides),
        teacher_dir / "config.toml",
    )
    teacher_metrics = evaluate_checkpoint(teacher_dir / "best.pt", device="cpu").metrics
    write_json(teacher_dir / "metrics.json", teacher_metrics)

    with caplog.at_level("INFO", logger="pgd_deploy.quickstart"):
        rows = run_quickstart(work, overrides=overrides, recipes=ROOT / "train")
    assert caplog.text.count("reusing the finished run") == 1  # the teacher only
    printed = capsys.readouterr().out
    assert f"measured on: {describe_cpu()}" in printed  # the figures name their machine
    stages = printed.split("minutes: ", 1)[1].splitlines()[0]
    assert stages.startswith("teacher 0.0, student ") and "int8 (QAT, export, latencies)" in stages
    board = json.loads((work / "scoreboard.json").read_text())
    assert board == rows
    assert [r["name"] for r in board] == ["teacher", "student", "pgd", "pgd-int8"]
    int8 = board[3]  # the QAT PGD student, exported (cpu target) and run by ONNX Runtime
    assert int8["runtime"] == "onnxruntime int8 (cpu target)" and int8["gates"] == "passed"
    assert int8["base_iters"] == 2 and 0.0 <= int8["agreement_with_fp32"] <= 1.0
    # the gate's, against the fake-quant model
    assert int8["agreement_with_source"] >= int8["agreement_with_source_min"] == 0.9
    assert int8["agreement_with_source_iou"] == int8["agreement_with_fp32_iou"] == 0.5
    assert (
        f"with its source, the fake-quant model QAT trained: {int8['agreement_with_source']:.3f}"
        in printed
    )
    assert Path(int8["checkpoint"]).suffix == ".onnx"
    manifest = json.loads((work / "pgd-int8" / "pgd-int8.manifest.json").read_text())
    assert manifest["int8_target"] == "cpu" and manifest["recipe"]["scales"].startswith("learned")
    assert manifest["recipe"]["fp32_reference"] == str(work / "pgd" / "best.pt")
    gates = {r["name"]: r for r in manifest["gates"]["results"]}
    for row in board:
        assert {"name", "AP", "AP50", "params", "cpu_ms_per_image", "train_iters", "seed"} <= set(
            row
        )
        if row is int8:  # ONNX Runtime's AP, measured by the export's mAP gate
            real = gates["map"]["detail"]["exported"]
        else:
            real = evaluate_checkpoint(row["checkpoint"], device="cpu").metrics
        assert (row["AP"], row["AP50"]) == (round(real["AP"], 4), round(real["AP50"], 4)), row
        assert row["cpu_ms_per_image"] > 0 and row["params"] > 1e6
    teacher, student, pgd = board[:3]
    assert teacher["AP50"] > 0.1
    # inherited neck and head (docs/method.md D1): it detects after 2 steps
    assert pgd["AP"] > student["AP"]
    assert student["train_iters"] == pgd["train_iters"] == 2  # same budget for both students
    pgd_config = (work / "pgd" / "config.toml").read_text()
    assert f'teacher = "{teacher_dir / "best.pt"}"' in pgd_config
    caplog.clear()
    with caplog.at_level("INFO", logger="pgd_deploy.quickstart"):
        run_quickstart(work, overrides=overrides, recipes=ROOT / "train")
    assert caplog.text.count("reusing the finished run") == 4
    assert f"reusing the export {work / 'pgd-int8' / 'pgd-int8.onnx'} (" in caplog.text

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
    with caplog.at_level("INFO", logger="pgd_deploy.quickstart"):
        rows = run_quickstart(work, overrides=overrides, recipes=ROOT / "train")
    assert caplog.text.count("reusing the finished run") == 3
    assert "student: continuing the unfinished run" in caplog.text
    assert rows[1]["train_iters"] == 2 and (work / "student" / "metrics.json").is_file()


def test_a_saved_config_is_read_literally_not_with_todays_head_defaults(tmp_path):
    """A run saved before `distill.teacher_score` existed used the class score: the demo must
    not take it for a run of today's ATSS default (class x IoU) and reuse it."""
    from pgd_deploy.quickstart import _same_config

    atss = load_config(TrainJob, None, ["model.head='atss'", "distill.teacher='t.pt'"])
    assert atss.distill.teacher_score == "detection"
    save_config(atss, tmp_path / "config.toml")
    assert _same_config(tmp_path, atss)
    text = (tmp_path / "config.toml").read_text()
    old = "".join(line for line in text.splitlines(True) if not line.startswith("teacher_score"))
    assert old != text
    (tmp_path / "config.toml").write_text(old)
    assert not _same_config(tmp_path, atss)
    official = load_config(
        TrainJob,
        None,
        ["model.head='atss'", "distill.teacher='t.pt'", "distill.teacher_score='class'"],
    )
    assert _same_config(tmp_path, official)
    (tmp_path / "config.toml").write_bytes(b"\xff\xfe not toml")
    assert not _same_config(tmp_path, atss)


def test_a_pgd_setting_does_not_retrain_the_teacher(tmp_path):
    from pgd_deploy.quickstart import _same_config

    teacher = load_config(TrainJob, ROOT / "train" / "quickstart_teacher.toml")
    save_config(teacher, tmp_path / "config.toml")
    pgd_keys = ["distill.topk=9", "distill.teacher_score='detection'", "qat.calib_images=8"]
    assert _same_config(
        tmp_path, load_config(TrainJob, ROOT / "train" / "quickstart_teacher.toml", pgd_keys)
    )
    assert not _same_config(
        tmp_path,
        load_config(TrainJob, ROOT / "train" / "quickstart_teacher.toml", ["train.seed=1"]),
    )
    pgd = load_config(TrainJob, ROOT / "train" / "quickstart_pgd.toml")
    save_config(pgd, tmp_path / "config.toml")  # a distilling run: its distill keys count
    assert not _same_config(
        tmp_path, load_config(TrainJob, ROOT / "train" / "quickstart_pgd.toml", ["distill.topk=9"])
    )


def test_an_int8_export_gated_by_the_old_agreement_is_not_reused():
    """Before 2026-12-06 the agreement gate compared a QAT export with fp32 only: its manifest
    lacks what the scoreboard reads, so the demo exports again instead of failing on it."""
    from pgd_deploy.quickstart import _gated_as_now

    def manifest(detail):
        return {"gates": {"results": [{"name": "parity"}, {"name": "agreement", "detail": detail}]}}

    assert _gated_as_now(manifest({"agreement": 0.94, "agreement_with_fp32": 0.92}))
    assert not _gated_as_now(manifest({"agreement": 0.78}))
    assert not _gated_as_now({"status": "passed"})
