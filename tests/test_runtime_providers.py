"""ONNX Runtime providers: chosen explicitly from what onnxruntime offers, never a silent CPU run
when a GPU was asked for, and the provider that ran shown by `describe()` (the demo) and the
benchmark table."""

from __future__ import annotations

import logging

import pytest

ort = pytest.importorskip("onnxruntime")

from _export_fixtures import make_checkpoint  # noqa: E402

from pgd_deploy.runtime.backends import OrtBackend  # noqa: E402
from pgd_deploy.runtime.providers import (  # noqa: E402
    CPU,
    CUDA,
    TENSORRT,
    check_session_providers,
    select_providers,
)

CPU_ONLY = ["AzureExecutionProvider", CPU]
GPU = [TENSORRT, CUDA, CPU]


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    from pgd_deploy.export.to_onnx import export_checkpoint_onnx

    root = tmp_path_factory.mktemp("providers")
    ckpt = make_checkpoint(root / "m.pt", cls_bias=-0.5, box_bias=1.5)
    return export_checkpoint_onnx(ckpt, root / "m.onnx", imgsz=(64, 64), simplify=False)


def test_providers_follow_the_device_and_what_onnxruntime_offers():
    assert select_providers("auto", CPU_ONLY) == [CPU]
    assert select_providers("auto", GPU) == [(CUDA, {"device_id": 0}), CPU]
    assert select_providers("cpu", GPU) == [CPU]
    assert select_providers("cuda:1", GPU) == [(CUDA, {"device_id": 1}), CPU]
    assert select_providers("tensorrt", GPU) == [
        (TENSORRT, {"device_id": 0}),
        (CUDA, {"device_id": 0}),
        CPU,
    ]
    assert select_providers("tensorrt:2", [TENSORRT, CPU]) == [(TENSORRT, {"device_id": 2}), CPU]


@pytest.mark.parametrize(
    "device, missing", [("cuda", CUDA), ("cuda:1", CUDA), ("tensorrt", TENSORRT)]
)
def test_gpu_device_without_a_gpu_provider_is_refused(device, missing):
    with pytest.raises(ValueError, match=f"device '{device}': this onnxruntime has no {missing}"):
        select_providers(device, CPU_ONLY)
    with pytest.raises(ValueError, match="onnxruntime-gpu"):
        select_providers(device, CPU_ONLY)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CUDA"])
def test_unknown_device_is_refused(device):
    with pytest.raises(ValueError, match=r"expected auto, cpu, cuda\[:N\] or tensorrt\[:N\]"):
        select_providers(device, GPU)


def test_gpu_device_on_this_onnxruntime_is_refused_by_the_backend(onnx_model):
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    from pgd_deploy.runtime.backends import load_backend

    with pytest.raises(ValueError, match=f"device 'cuda': this onnxruntime has no {CUDA}"):
        load_backend(onnx_model, device="cuda")  # what pgd-serve --device cuda does


def test_a_listed_gpu_provider_that_does_not_load_is_not_a_silent_cpu_run(
    onnx_model, monkeypatch, caplog
):
    """onnxruntime-gpu lists the CUDA provider even when its CUDA/cuDNN libraries are missing;
    the session then runs on the CPU with only a log line. Here the CPU build plays that part."""
    if CUDA in ort.get_available_providers():
        pytest.skip("the CUDA provider really loads here")
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    with pytest.raises(ValueError, match=r"asked for device 'cuda' \(CUDAExecutionProvider\)"):
        OrtBackend(onnx_model, device="cuda")
    with caplog.at_level(logging.WARNING, logger="pgd_deploy.runtime.providers"):
        backend = OrtBackend(onnx_model, device="auto")  # auto: allowed, but said
    assert backend.provider == CPU
    assert "running on CPUExecutionProvider" in caplog.text


def test_session_check_accepts_what_was_asked():
    assert check_session_providers("m.onnx", "cuda", [(CUDA, {}), CPU], [CUDA, CPU]) == CUDA
    assert check_session_providers("m.onnx", "cpu", [CPU], [CPU]) == CPU
    with pytest.raises(ValueError, match="m.onnx: asked for device 'tensorrt'"):
        check_session_providers("m.onnx", "tensorrt", [(TENSORRT, {}), CPU], [CPU])


def test_provider_in_describe_and_in_the_benchmark_table(onnx_model):
    from pgd_deploy.export import bench, bench_report

    backend = OrtBackend(onnx_model, device="cpu")
    assert backend.provider == CPU
    assert backend.describe() == "onnxruntime (CPUExecutionProvider) fp32 64x64"  # the demo's
    rows = bench.run_bench(
        [bench.Target("student", onnx_model)], warmup=1, iters=2, min_seconds=0.0, device="cpu"
    )
    runtimes = {r.runtime for r in rows}
    assert "onnxruntime (CPUExecutionProvider)" in runtimes and "torch (CPU)" in runtimes
    assert "| onnxruntime (CPUExecutionProvider) |" in bench_report.format_table(rows)
