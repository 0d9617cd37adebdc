"""The torch backend at fp32 / bf16 / fp16, eager or compiled, gated against fp32 eager like an
export (issue 12). CPU here: bf16 (this CPU's oneDNN has bf16 kernels, else those tests skip);
fp16 and channels-last on CUDA are in tests/test_gpu.py."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _export_fixtures import coco128, make_checkpoint

from pgd_deploy.config import DataConfig, ExportConfig, GatesConfig, ServeConfig
from pgd_deploy.export.gates import gate_torch_backend
from pgd_deploy.export.images import gate_images
from pgd_deploy.runtime.backends import load_backend
from pgd_deploy.runtime.preprocess import load_image
from pgd_deploy.serve.artifacts import open_gated

IMGSZ = (96, 128)
needs_cpu_bf16 = pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    reason="this CPU has no bf16 kernels (avx512_bf16 or amx_bf16)",
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(
        tmp_path_factory.mktemp("precision") / "live.pt", cls_bias=-0.5, box_bias=1.5
    )


def _images(count: int) -> list[np.ndarray]:
    return [load_image(p) for p in sorted(coco128().glob("*.jpg"))[:count]]


@needs_cpu_bf16
def test_bf16_runs_in_bf16_and_returns_float32(ckpt):
    fp32 = load_backend(ckpt, input_size=IMGSZ)
    bf16 = load_backend(ckpt, input_size=IMGSZ, precision="bf16")
    assert fp32.describe() == "torch (CPU) fp32 96x128"
    assert bf16.describe() == "torch (CPU) bf16 96x128" and bf16.precision == "bf16"
    batch, _ = bf16.preprocess(_images(2))
    ref, out = fp32.infer(batch), bf16.infer(batch)
    for name in ("boxes", "scores"):
        assert out[name].dtype == np.float32 and out[name].shape == ref[name].shape
    diff = np.abs(out["scores"] - ref["scores"])
    assert 0 < diff.max() < 0.02  # it ran in bf16 (not fp32), and stayed close


def test_precisions_a_device_cannot_run_are_refused(ckpt, tmp_path):
    with pytest.raises(ValueError, match="fp16 needs CUDA; on the CPU use bf16 or fp32"):
        load_backend(ckpt, device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="precision: expected one of fp32, fp16, bf16"):
        load_backend(ckpt, device="cpu", precision="int4")
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"m.onnx: precision bf16 apply to checkpoints"):
        load_backend(onnx, precision="bf16")


def test_channels_last_on_the_cpu_when_asked(ckpt):
    backend = load_backend(ckpt, input_size=IMGSZ, device="cpu", channels_last="on")
    assert backend.describe() == "torch (CPU) fp32 channels-last 96x128"
    assert backend.model.head.cls_logits.weight.is_contiguous(memory_format=torch.channels_last)
    ref = load_backend(ckpt, input_size=IMGSZ, device="cpu")
    assert not ref.channels_last  # auto: NHWC on CUDA at 16 bits only
    batch, _ = ref.preprocess(_images(1))
    np.testing.assert_allclose(
        backend.infer(batch)["scores"], ref.infer(batch)["scores"], atol=1e-5
    )


@needs_cpu_bf16
def test_bf16_of_a_trained_checkpoint_passes_the_export_gates_with_map(trained_run):
    ckpt = trained_run["checkpoint"]
    cfg = ExportConfig(val=str(trained_run["val_json"]), val_images=str(trained_run["val_images"]))
    images = gate_images(cfg, DataConfig(), 16)
    backend = load_backend(ckpt, precision="bf16")
    report = gate_torch_backend(backend, images)
    assert report.precision == "bf16" and report.images == 16
    by_name = {r.name: r for r in report.results}
    assert by_name["map"].passed is True  # annotations: the mAP gate ran, fp16 tolerance
    assert by_name["agreement"].detail["reference_detections"] > 0
    assert by_name["parity"].threshold.startswith("mean abs <= 0.01")  # fp16 ONNX tolerances
    assert report.passed, report.to_markdown()
    # Impossible tolerances: the same comparison must fail, or the gate measures nothing.
    strict = GatesConfig(fp16_mean_abs=0.0, fp16_mean_rel=0.0)
    assert not gate_torch_backend(backend, images, gates=strict).passed


@needs_cpu_bf16
def test_serving_refuses_a_setting_that_fails_its_gates(ckpt, caplog):
    images = _images(4)
    strict = GatesConfig(fp16_mean_abs=0.0, fp16_mean_rel=0.0)
    options = ServeConfig(precision="bf16").torch_options()
    with pytest.raises(ValueError, match=r"live.pt: torch \(CPU\) bf16 .* fails the export gates"):
        open_gated(ckpt, images, device="cpu", options=options, gates=strict, source="four")
    with caplog.at_level("WARNING", logger="pgd_deploy.serve.artifacts"):
        backend = open_gated(
            ckpt, images, device="cpu", options=options, gates=strict, allow_failed=True
        )
    assert backend.precision == "bf16" and "serving it anyway" in caplog.text
    fp32 = open_gated(ckpt, [], device="cpu", options=ServeConfig().torch_options())
    assert fp32.precision == "fp32"  # fp32 eager is the reference: nothing to gate


def test_demo_sides_take_their_own_settings():
    cfg = ServeConfig(precision="bf16", compile=True, student_precision="fp32")
    cfg = dataclasses.replace(cfg, teacher_compile=False)
    assert cfg.torch_options("teacher") == {
        "precision": "bf16",
        "compile": False,
        "compile_mode": "default",
        "channels_last": "auto",
    }
    assert cfg.torch_options("student")["precision"] == "fp32"
    assert cfg.torch_options("student")["compile"] is True
    assert cfg.torch_options()["precision"] == "bf16"


@pytest.mark.slow
@pytest.mark.xfail(
    os.environ.get("ATEN_CPU_CAPABILITY") == "default",
    raises=torch._dynamo.exc.BackendCompilerFailed,
    strict=False,
    reason="torch 2.14's inductor emits at::vec code that does not compile without a vector ISA "
    "(ATEN_CPU_CAPABILITY=default, make test-isa's sse41 path): 'at::vec has not been declared'",
)
def test_compiled_backend_matches_fp32_eager_and_passes_the_gates(trained_run):
    """torch.compile (inductor, C++ on the CPU): minutes on a 2-core machine the first time.
    A trained checkpoint: random weights tie thousands of scores, and the max_det cut among
    ties is not a property of the compiler."""
    backend = load_backend(trained_run["checkpoint"], device="cpu", compile=True)
    assert backend.compiled and backend.describe() == "torch (CPU) fp32 compiled 64x64"
    cfg = ExportConfig(val=str(trained_run["val_json"]), val_images=str(trained_run["val_images"]))
    report = gate_torch_backend(backend, gate_images(cfg, DataConfig(), 8), batch_size=8)
    parity = next(r for r in report.results if r.name == "parity")
    assert parity.threshold == "boxes max <= 0.001, scores max <= 0.0001"  # fp32 tolerances
    assert report.passed, report.to_markdown()


@needs_cpu_bf16
def test_pgd_serve_predict_runs_a_checkpoint_in_bf16(ckpt, tmp_path, capsys, caplog):
    import json
    import shutil

    from pgd_deploy.serve.command import main

    src = tmp_path / "src"
    src.mkdir()
    for p in sorted(coco128().glob("*.jpg"))[:3]:
        shutil.copy(p, src / p.name)
    (src / "broken.jpg").write_bytes(b"not an image")  # passed over by the gate, failed by the run
    argv = ["predict", "--model", str(ckpt), "--source", str(src), "--no-progress", "--batch", "2"]
    with caplog.at_level("INFO", logger="pgd_deploy.serve.artifacts"):
        main([*argv, "--out", str(tmp_path / "bf16"), "--precision", "bf16"])
    summary = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert summary["backend"] == "torch (CPU) bf16 128x128"
    assert (summary["succeeded"], summary["failed"]) == (3, 1)
    assert "### Gates: torch (CPU) bf16 128x128 (bf16)" in caplog.text
    assert "3 readable inputs of" in caplog.text and "Overall: **PASSED**" in caplog.text
    assert main([*argv, "--out", str(tmp_path / "fp16"), "--precision", "fp16"]) == 2
    assert "precision fp16 needs CUDA" in capsys.readouterr().err


@needs_cpu_bf16
def test_demo_runs_each_side_at_its_own_precision_and_says_so(ckpt):
    pytest.importorskip("gradio")
    from pgd_deploy.serve.gradio_app import open_app

    cfg = ServeConfig(student_precision="bf16")
    app = open_app(ckpt, ckpt, cfg=cfg, device="cpu", gate_images=_images(2), gate_source="two")
    teacher, student = app.models
    assert (teacher.backend.precision, student.backend.precision) == ("fp32", "bf16")
    comparison, _ = app.detect(_images(1)[0], 0.3, 0.6)
    rows = {row[0]: row[1] for row in app.latency_rows(comparison)}  # the latency panel
    assert rows == {"teacher": "torch (CPU) fp32 128x128", "student": "torch (CPU) bf16 128x128"}


def test_serve_flags_reach_the_config():
    from pgd_deploy.serve.command import _config, _parser

    demo = ["demo", "--teacher", "t.pt", "--student", "s.pt", "--precision", "bf16", "--compile"]
    cfg = _config(
        _parser().parse_args([*demo, "--teacher-precision", "fp32", "--no-student-compile"])
    )
    assert cfg.torch_options("teacher")["precision"] == "fp32"
    assert cfg.torch_options("teacher")["compile"] is True
    assert cfg.torch_options("student") == {
        "precision": "bf16",
        "compile": False,
        "compile_mode": "default",
        "channels_last": "auto",
    }
    predict = ["predict", "--model", "m.pt", "--source", "d", "--precision", "fp16"]
    cfg = _config(_parser().parse_args([*predict, "--compile-mode", "max-autotune"]))
    assert (cfg.precision, cfg.compile, cfg.compile_mode, cfg.gate_images) == (
        "fp16",
        False,
        "max-autotune",
        16,
    )


def test_the_backend_asks_for_bfloat16_for_bf16_on_any_cpu(monkeypatch):
    """The backend's choice of dtype, held also where the bf16 runs below skip: "bf16" is
    torch.bfloat16 (never float16), on a CPU whose oneDNN has bf16 kernels (here declared so)."""
    from pgd_deploy.runtime.torch_backend import _autocast_dtype

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert _autocast_dtype(torch, "bf16", cpu, "x.pt") is torch.bfloat16
    assert _autocast_dtype(torch, "fp32", cpu, "x.pt") is None
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.raises(ValueError, match="no bf16 kernels"):
        _autocast_dtype(torch, "bf16", cpu, "x.pt")


@needs_cpu_bf16
def test_bf16_on_the_cpu_runs_the_convolutions_in_bfloat16(ckpt):
    """Not only outputs a little off fp32 (an fp16 autocast would pass that): the layers run in
    bfloat16, seen at every convolution's output."""
    backend = load_backend(str(ckpt), device="cpu", precision="bf16")
    seen: set[torch.dtype] = set()
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
        for m in backend.model.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    try:
        backend.infer(np.zeros((1, 3, *backend.input_size), np.float32))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {torch.bfloat16}, seen
