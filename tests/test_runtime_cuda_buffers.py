"""The TensorRT runner's device-buffer library: pycuda first, else cuda-python, else torch with
CUDA, one log line saying which; selection tested on a CPU with stand-in modules."""

from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pytest

from pgd_deploy.runtime import cuda_buffers
from pgd_deploy.runtime.cuda_buffers import (
    HostBuffer,
    PycudaBuffers,
    select_library,
)


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _fake_torch(cuda: bool) -> types.ModuleType:
    return _module("torch", cuda=types.SimpleNamespace(is_available=lambda: cuda))


@pytest.fixture
def libraries(monkeypatch):
    """Make each library present (a stand-in module) or absent, in sys.modules."""

    def set_(*, pycuda: bool, cuda_python: bool, torch: bool | None) -> dict:
        mods = {
            "pycuda": _module("pycuda") if pycuda else None,
            "pycuda.driver": _module("pycuda.driver") if pycuda else None,
            "cuda": _module("cuda") if cuda_python else None,
            "cuda.bindings": _module("cuda.bindings") if cuda_python else None,
            "cuda.bindings.runtime": _module("cuda.bindings.runtime") if cuda_python else None,
            "cuda.cudart": None,
            "torch": None if torch is None else _fake_torch(torch),
        }
        for name, module in mods.items():
            monkeypatch.setitem(sys.modules, name, module)
        return mods

    return set_


def test_pycuda_is_the_default(libraries, caplog):
    mods = libraries(pycuda=True, cuda_python=True, torch=True)
    with caplog.at_level(logging.INFO, logger="pgd_deploy.runtime.cuda_buffers"):
        name, module = select_library()
    assert name == "pycuda" and module is mods["pycuda.driver"]
    assert [r.getMessage() for r in caplog.records] == [
        "TensorRT runner: device buffers through pycuda"
    ]


def test_without_pycuda_cuda_python_is_used_and_said_once(libraries, caplog):
    mods = libraries(pycuda=False, cuda_python=True, torch=True)
    with caplog.at_level(logging.INFO, logger="pgd_deploy.runtime.cuda_buffers"):
        name, module = select_library()
    assert name == "cuda-python" and module is mods["cuda.bindings.runtime"]
    assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.WARNING
    message = caplog.records[0].getMessage()
    assert message.startswith("TensorRT runner: device buffers through cuda-python (pycuda: ")


def test_without_pycuda_and_cuda_python_torch_cuda_tensors_are_used(libraries, caplog):
    libraries(pycuda=False, cuda_python=False, torch=True)
    with caplog.at_level(logging.INFO, logger="pgd_deploy.runtime.cuda_buffers"):
        name, _ = select_library()
    assert name == "torch"
    message = caplog.records[0].getMessage()
    assert "through torch" in message and "pycuda:" in message and "cuda-python:" in message


@pytest.mark.parametrize("torch", [False, None])  # torch without CUDA, or no torch at all
def test_without_any_library_the_error_says_what_to_install(libraries, torch):
    libraries(pycuda=False, cuda_python=False, torch=torch)
    with pytest.raises(ImportError) as err:
        select_library()
    message = str(err.value)
    assert "needs pycuda, cuda-python or torch with CUDA" in message
    assert "pgd-deploy[trt]" in message and "pip install cuda-python" in message
    if torch is False:
        assert "torch: torch is installed but sees no CUDA device" in message


def test_the_runner_opens_the_selected_library(libraries, monkeypatch):
    libraries(pycuda=False, cuda_python=True, torch=False)
    opened = []
    monkeypatch.setitem(
        cuda_buffers.IMPLEMENTATIONS, "cuda-python", lambda module, device: opened.append(device)
    )
    cuda_buffers.open_buffers(3)
    assert opened == [3]


def test_cuda_python_reports_cuda_errors_by_name():
    """Real cuda-python where it is installed: without a driver its calls return an error code,
    which becomes a RuntimeError naming it; with a GPU the device is described."""
    runtime = pytest.importorskip("cuda.bindings.runtime")
    try:
        lib = cuda_buffers.CudaPythonBuffers(runtime, 0)
    except RuntimeError as err:
        assert str(err).startswith("CUDA error (cuda-python): cuda")
    else:
        major, _ = lib.compute_capability()
        assert major >= 5 and lib.device_name()


class _FakePycuda:
    """Records the pycuda calls `PycudaBuffers` makes (the documented pycuda.driver API)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        fake = self

        class Context:
            @staticmethod
            def pop():
                fake.calls.append(("pop",))

        class Primary:
            def push(self):
                fake.calls.append(("push",))

        class Device:
            def __init__(self, index):
                fake.calls.append(("device", index))

            def retain_primary_context(self):
                return Primary()

            def name(self):
                return "NVIDIA L4"

            def compute_capability(self):
                return (8, 9)

        class Stream:
            handle = 1234

            def synchronize(self):
                fake.calls.append(("sync",))

        self.Context, self.Device, self.Stream = Context, Device, Stream

    def init(self):
        self.calls.append(("init",))

    def mem_alloc(self, nbytes):
        self.calls.append(("mem_alloc", nbytes))
        return 0xD000

    def pagelocked_empty(self, count, dtype):
        return np.zeros(count, dtype)

    def memcpy_htod_async(self, dst, src, stream):
        self.calls.append(("htod", dst, src.nbytes))

    def memcpy_dtoh_async(self, dst, src, stream):
        self.calls.append(("dtoh", src, dst.nbytes))


def test_pycuda_buffers_glue():
    cuda = _FakePycuda()
    lib = PycudaBuffers(cuda, 2)
    assert lib.stream_handle == 1234 and lib.compute_capability() == (8, 9)
    with lib.active():
        device, host = lib.device(24), lib.host(24)
        host.view((2, 3), np.float32)[...] = 1.5
        lib.to_device(device, host, 24)
        lib.to_host(host, device, 8)
        lib.synchronize()
    assert device.ptr == 0xD000 and host.view((2, 3), np.float32).sum() == 9.0
    assert cuda.calls[:3] == [("init",), ("device", 2), ("push",)]
    assert ("htod", 0xD000, 24) in cuda.calls and ("dtoh", 0xD000, 8) in cuda.calls
    assert cuda.calls.count(("push",)) == cuda.calls.count(("pop",)) == 2


def test_host_buffer_views_share_memory():
    buffer = HostBuffer(np.zeros(64, np.uint8))
    view = buffer.view((2, 4), np.float32)
    view[1, 3] = 2.0
    assert buffer.view((8,), np.float32)[7] == 2.0 and buffer.nbytes == 64


def _gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["pycuda", "cuda-python", "torch"])
def test_round_trip_through_the_device(name):
    """Each buffer library for real: host -> device -> host on its stream."""
    try:
        module = cuda_buffers.IMPORTERS[name]()
    except ImportError as err:
        pytest.skip(f"{name} not importable: {err}")
    lib = cuda_buffers.IMPLEMENTATIONS[name](module, 0)
    major, _ = lib.compute_capability()
    assert major >= 5 and lib.device_name() and lib.stream_handle
    values = np.arange(16, dtype=np.float32)
    with lib.active():
        device, host, back = lib.device(64), lib.host(64), lib.host(64)
        host.view((16,), np.float32)[...] = values
        lib.to_device(device, host, 64)
        lib.to_host(back, device, 64)
        lib.synchronize()
    np.testing.assert_array_equal(back.view((16,), np.float32), values)
