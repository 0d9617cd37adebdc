"""Every long step shows progress and what it does (issue 33, part 6): `pgd-export`'s gates,
its ONNX build steps and int8 calibration, `pgd-export bench`, the evaluation of `pgd-train`
(its training bar used to sit still for minutes) and the TensorRT build."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from pgd_deploy.progress import Progress, timed_step


def test_progress_bar_and_timed_step(capsys, caplog) -> None:
    pytest.importorskip("tqdm")
    with Progress(4, "work", unit="img") as bar:
        bar.update(3)
        bar.note("now this")
    assert "work" in capsys.readouterr().err
    with Progress(4, "hidden", enabled=False) as bar:
        bar.update(4)
    assert "hidden" not in capsys.readouterr().err
    with caplog.at_level(logging.INFO, logger="pgd_deploy.progress"), timed_step("a step"):
        pass
    assert "a step ..." in caplog.text and "a step: 0.0 s" in caplog.text


def test_export_shows_its_steps_and_gates(tmp_path, capsys, caplog) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("tqdm")
    from _export_fixtures import make_checkpoint

    from pgd_deploy.export.command import main

    ckpt = make_checkpoint(tmp_path / "s.pt")
    argv = ["--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), "--imgsz", "64x64"]
    with caplog.at_level(logging.INFO):
        assert main([*argv, "--gate-images", "3", "--precision", "int8"]) == 0
    err = capsys.readouterr().err
    assert "gates of s_int8_cpu.onnx (ONNX Runtime CPUExecutionProvider)" in err
    assert "int8 calibration (minmax, cpu target)" in err
    assert "exporting the network to ONNX (legacy exporter, opset 17, 64x64): " in caplog.text


def test_evaluation_shows_progress(tmp_path, capsys) -> None:
    pytest.importorskip("tqdm")
    from _export_fixtures import make_checkpoint

    from pgd_deploy.cli import train_main

    ckpt = make_checkpoint(tmp_path / "s.pt")
    args = ["eval", "--checkpoint", str(ckpt), "--set", "data.shapes_val=3"]
    assert train_main([*args, "--set", f"data.cache_dir={tmp_path}"]) == 0
    assert "evaluating on 3 images of val.json" in capsys.readouterr().err


def test_bench_shows_its_rounds(tmp_path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tqdm")
    from serve_helpers import onnx_model, student_checkpoint

    from pgd_deploy.export.command import main

    factory = SimpleNamespace(getbasetemp=lambda: tmp_path)
    model = onnx_model(factory, student_checkpoint(factory))
    argv = ["bench", "--artifact", str(model), "--iters", "10", "--warmup", "1"]
    assert main([*argv, "--min-seconds", "0", "--torch-precision", "fp32"]) == 0
    assert "timing 2 runtimes at batch 1, interleaved" in capsys.readouterr().err


def test_tensorrt_build_monitor_follows_the_phases(caplog) -> None:
    """The monitor's own logic, on a stand-in for `trt.IProgressMonitor` (TensorRT cannot run
    here; `tests/test_export_trt.py` builds real engines on a GPU)."""
    from pgd_deploy.export.to_tensorrt import build_progress

    class Base:
        def __init__(self) -> None:
            self.initialised = True

    assert build_progress(SimpleNamespace()) is None  # TensorRT before 10: no monitor API
    monitor = build_progress(SimpleNamespace(IProgressMonitor=Base))
    assert monitor.initialised  # the bindings need the base constructor called
    with caplog.at_level(logging.INFO, logger="pgd_deploy.export.to_tensorrt"):
        monitor.phase_start("Building engine", None, 3)
        monitor.phase_start("Tactic selection", "Building engine", 10)
        assert all(monitor.step_complete("Tactic selection", i) for i in range(10))
        monitor.phase_finish("Tactic selection")
        assert monitor.step_complete("Building engine", 0) is True
        monitor.phase_finish("Building engine")
    assert "TensorRT build: Building engine ..." in caplog.text
    assert "Tactic selection ..." not in caplog.text  # sub-phases: bars only
    assert monitor.bars == {}
