"""Tests of the `pgd-serve` command line: help, configuration layering and the demo server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from serve_helpers import (
    default_sigint,
    export_onnx,
    make_checkpoint,
    onnx_model,
    student_checkpoint,
)

from pgd_deploy.serve.command import _config, _parser, main

TORCH_FREE_MAIN = (
    "import sys; sys.modules['torch'] = None  # serving needs no torch\n"
    "from pgd_deploy.serve.command import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.parametrize("argv", [["--help"], ["predict", "--help"], ["demo", "--help"]])
def test_help(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert "pgd-serve" in capsys.readouterr().out


def test_console_script_help() -> None:
    exe = Path(sys.executable).with_name("pgd-serve")
    if not exe.exists():
        pytest.skip("pgd-serve console script not installed in this environment")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "predict" in proc.stdout and "demo" in proc.stdout


def test_config_layers_defaults_toml_set_and_flags(tmp_path: Path) -> None:
    toml = tmp_path / "serve.toml"
    toml.write_text("batch = 4\nworkers = 3\nnms_thresh = 0.5\n")
    args = _parser().parse_args(
        ["predict", "--model", "m.onnx", "--source", "d", "--config", str(toml)]
        + ["--set", "workers=1", "--batch", "16", "--score-thresh", "0.25"]
    )
    cfg = _config(args)
    assert (cfg.batch, cfg.workers, cfg.nms_thresh, cfg.score_thresh) == (16, 1, 0.5, 0.25)
    assert cfg.queue_size == 32  # untouched default
    demo = _config(_parser().parse_args(["demo", "--teacher", "a", "--student", "b"]))
    assert (demo.host, demo.port) == ("127.0.0.1", 7860)
    demo = _config(
        _parser().parse_args(["demo", "--teacher", "a", "--student", "b", "--score-thresh", "0.5"])
    )
    assert demo.demo_score == 0.5  # the demo's score slider starts there


def test_unknown_config_key_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["predict", "--model", "m.onnx", "--source", str(tmp_path), "--set", "batchh=2"]
    assert main(argv) == 2
    assert "batchh" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_demo_command_serves_until_ctrl_c(tmp_path_factory: pytest.TempPathFactory) -> None:
    pytest.importorskip("gradio")
    model = onnx_model(tmp_path_factory, student_checkpoint(tmp_path_factory))
    port = _free_port()
    tmpdir = tmp_path_factory.mktemp("tmpdir")  # the demo's temporary files go here
    argv = ["demo", "--teacher", str(model), "--student", str(model), "--port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, "-c", TORCH_FREE_MAIN, *argv, "--set", "warmup=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=default_sigint,
        env={**os.environ, "TMPDIR": str(tmpdir)},
    )
    try:
        deadline = time.monotonic() + 180
        page = ""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    page = resp.read().decode("utf-8", "replace")
                    break
            except OSError:
                time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0]
        assert "teacher vs student" in page
        assert len(list(tmpdir.glob("pgd-serve-examples-*"))) == 1
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (0, 130), output
    assert f"127.0.0.1:{port}" in output
    assert not list(tmpdir.glob("pgd-serve-examples-*"))  # every demo start used to leave one


def test_shipped_config_equals_the_defaults() -> None:
    from pgd_deploy.config import ServeConfig, load_config

    path = Path(__file__).resolve().parents[1] / "serve" / "configs" / "default.toml"
    assert load_config(ServeConfig, path) == ServeConfig()


def test_an_export_marked_failed_is_refused_unless_allowed(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("onnx")
    from PIL import Image

    from pgd_deploy.export.command import main as export_main
    from pgd_deploy.runtime.manifest import read_manifest

    # A real pgd-export run whose parity gate cannot pass: the artifact is kept, marked failed.
    flags = ["--imgsz", "128x128", "--gate-images", "2", "--batch-opt", "1", "--batch-max", "2"]
    impossible = ["--set", "gates.fp32_box_atol=1e-12", "--set", "gates.fp32_score_atol=1e-12"]
    ckpt = student_checkpoint(tmp_path_factory)
    out = tmp_path / "exports"
    argv = ["--checkpoint", str(ckpt), "--out", str(out), "--name", "strict", "--no-simplify"]
    assert export_main([*argv, *flags, *impossible]) == 3
    model = out / "strict.onnx"
    assert read_manifest(model)["status"] == "failed"
    capsys.readouterr()
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (80, 60), (90, 120, 200)).save(src / "a.png")
    predict = ["predict", "--model", str(model), "--source", str(src), "--no-progress"]
    # It used to be served without a word.
    assert main([*predict, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert f"{model}: its manifest {out / 'strict.manifest.json'} says status 'failed'" in err
    assert "parity" in err and "pass --allow-failed to serve it anyway" in err
    assert not (tmp_path / "refused").exists()
    with caplog.at_level("WARNING", logger="pgd_deploy.serve.artifacts"):
        assert main([*predict, "--out", str(tmp_path / "allowed"), "--allow-failed"]) == 0
    assert "says status 'failed'" in caplog.text and "serving it anyway" in caplog.text
    pytest.importorskip("gradio")
    from pgd_deploy.serve.gradio_app import open_app

    with pytest.raises(ValueError, match="says status 'failed'"):
        open_app(model, model)  # the demo refuses it too


def test_predict_applies_the_artifacts_post_processing_unless_told(tmp_path: Path) -> None:
    """The manifest's postprocess block is the default; flags and --set override it."""
    pytest.importorskip("onnx")
    import json

    import numpy as np
    from PIL import Image

    from pgd_deploy.checkpoint import load_checkpoint, save_checkpoint
    from pgd_deploy.runtime.manifest import read_manifest

    # scores around 0.27 (many candidates); this model keeps 3 per image above 0.1
    state = load_checkpoint(make_checkpoint(tmp_path / "raw.pt", seed=4))
    state["config"]["model"].update(score_thresh=0.1, max_detections=3)
    ckpt = save_checkpoint({k: v for k, v in state.items() if k != "format"}, tmp_path / "s.pt")
    model = tmp_path / "s.onnx"
    export_onnx(ckpt, model, batch=(2, 2))
    post = read_manifest(model)["postprocess"]
    assert (post["score_thresh"], post["max_det"]) == (0.1, 3)
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(src / f"{i}.png")

    def scores(name: str, *flags: str) -> list[list[float]]:
        out = tmp_path / name
        argv = ["predict", "--model", str(model), "--source", str(src), "--out", str(out)]
        assert main([*argv, "--no-progress", *flags]) == 0
        entries = json.loads((out / "predictions.json").read_text())
        ids = sorted({e["image_id"] for e in entries})
        return [[e["score"] for e in entries if e["image_id"] == i] for i in ids]

    # It used to apply ServeConfig's 0.05 and 100 whatever the artifact said.
    default = scores("default")
    assert len(default) == 2 and all(len(s) == 3 and min(s) >= 0.1 for s in default)
    assert all(len(s) == 5 for s in scores("more", "--max-det", "5"))
    assert scores("stricter", "--score-thresh", "0.5") == []  # the scores are about 0.2
    assert all(len(s) == 4 for s in scores("set", "--set", "max_det=4"))
