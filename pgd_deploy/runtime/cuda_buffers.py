"""Device buffers for the TensorRT runner: pycuda, else cuda-python, else torch (torch-free import).

pycuda stays the default (users asked for it), but it builds from source against the CUDA headers
and often fails to install. A runner that cannot import it uses cuda-python (`cuda.bindings`, the
library NVIDIA's TensorRT samples use) or, when torch with CUDA is present, torch CUDA tensors;
it logs one line saying which. All three offer the same small interface (`CudaBuffers`): the
device's name and compute capability, a stream, device and pinned host allocations, asynchronous
copies and a stream sync. Nothing is imported at module level except numpy.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

LIBRARIES = ("pycuda", "cuda-python", "torch")  # the order of preference
INSTALL_HINT = (
    "pip install 'pgd-deploy[trt]' (pycuda), or pip install cuda-python, or a torch build with CUDA"
)


def _import_pycuda() -> Any:
    return importlib.import_module("pycuda.driver")


def _import_cuda_python() -> Any:
    try:
        return importlib.import_module("cuda.bindings.runtime")  # cuda-python >= 12.6
    except ImportError:
        return importlib.import_module("cuda.cudart")  # older cuda-python


def _import_torch_cuda() -> Any:
    torch = importlib.import_module("torch")
    if not torch.cuda.is_available():
        raise ImportError("torch is installed but sees no CUDA device")
    return torch


IMPORTERS: dict[str, Callable[[], Any]] = {
    "pycuda": _import_pycuda,
    "cuda-python": _import_cuda_python,
    "torch": _import_torch_cuda,
}


def select_library() -> tuple[str, Any]:
    """The first importable buffer library in `LIBRARIES` order, and its module.

    Logs one line naming the library (and, for a fallback, why pycuda was not used).

    Raises:
        ImportError: none of them can be imported (the message lists why, and what to install).
    """
    reasons = []
    for name in LIBRARIES:
        try:
            module = IMPORTERS[name]()
        except ImportError as err:
            reasons.append(f"{name}: {err}")
            continue
        if reasons:
            logger.warning(
                "TensorRT runner: device buffers through %s (%s)", name, "; ".join(reasons)
            )
        else:
            logger.info("TensorRT runner: device buffers through %s", name)
        return name, module
    raise ImportError(
        "the TensorRT runner needs pycuda, cuda-python or torch with CUDA for its device "
        f"buffers ({'; '.join(reasons)}): {INSTALL_HINT}"
    )


class DeviceBuffer:
    """`nbytes` of device memory at address `ptr` (kept alive by `owner`)."""

    def __init__(self, ptr: int, nbytes: int, owner: Any = None) -> None:
        self.ptr, self.nbytes, self.owner = int(ptr), int(nbytes), owner


class HostBuffer:
    """`nbytes` of pinned host memory as a flat uint8 array (kept alive by `owner`)."""

    def __init__(self, array: np.ndarray, owner: Any = None) -> None:
        self.array, self.owner = array, owner

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def view(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        return self.array[: count * dtype.itemsize].view(dtype).reshape(shape)


class CudaBuffers:
    """The interface every buffer library implements (see the module docstring)."""

    name = "?"
    stream_handle: int = 0

    def device_name(self) -> str:
        raise NotImplementedError

    def compute_capability(self) -> tuple[int, int]:
        raise NotImplementedError

    def versions(self) -> dict[str, str | None]:
        """{"cuda": runtime version, "driver": CUDA version the driver supports}."""
        return {"cuda": None, "driver": None}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Make this device (context) current for the calls inside."""
        yield

    def device(self, nbytes: int) -> DeviceBuffer:
        raise NotImplementedError

    def host(self, nbytes: int) -> HostBuffer:
        raise NotImplementedError

    def to_device(self, dst: DeviceBuffer, src: HostBuffer, nbytes: int) -> None:
        raise NotImplementedError

    def to_host(self, dst: HostBuffer, src: DeviceBuffer, nbytes: int) -> None:
        raise NotImplementedError

    def synchronize(self) -> None:
        raise NotImplementedError


def _version_text(v: int | None) -> str | None:
    return None if not v else f"{v // 1000}.{(v % 1000) // 10}"  # 12040 -> "12.4"


class PycudaBuffers(CudaBuffers):
    """pycuda: the device's primary context, pushed around each call."""

    name = "pycuda"

    def __init__(self, cuda: Any, index: int) -> None:
        cuda.init()
        self.cuda, self.dev = cuda, cuda.Device(index)
        self._ctx = self.dev.retain_primary_context()  # shared with other CUDA users
        with self.active():
            self.stream = cuda.Stream()
        self.stream_handle = self.stream.handle

    def device_name(self) -> str:
        return self.dev.name()

    def compute_capability(self) -> tuple[int, int]:
        major, minor = self.dev.compute_capability()
        return int(major), int(minor)

    def versions(self) -> dict[str, str | None]:
        cuda = ".".join(str(v) for v in self.cuda.get_version())
        return {"cuda": cuda, "driver": _version_text(self.cuda.get_driver_version())}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self._ctx.push()
        try:
            yield
        finally:
            self.cuda.Context.pop()

    def device(self, nbytes: int) -> DeviceBuffer:
        alloc = self.cuda.mem_alloc(max(nbytes, 1))
        return DeviceBuffer(int(alloc), nbytes, alloc)

    def host(self, nbytes: int) -> HostBuffer:
        return HostBuffer(self.cuda.pagelocked_empty(max(nbytes, 1), np.uint8))

    def to_device(self, dst: DeviceBuffer, src: HostBuffer, nbytes: int) -> None:
        self.cuda.memcpy_htod_async(dst.ptr, src.array[:nbytes], self.stream)

    def to_host(self, dst: HostBuffer, src: DeviceBuffer, nbytes: int) -> None:
        self.cuda.memcpy_dtoh_async(dst.array[:nbytes], src.ptr, self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()


class CudaPythonBuffers(CudaBuffers):
    """cuda-python's runtime API (`cudaSetDevice` selects the device's primary context)."""

    name = "cuda-python"

    def __init__(self, cudart: Any, index: int) -> None:
        self.rt, self.index = cudart, int(index)
        with self.active():
            self._props = self._call(cudart.cudaGetDeviceProperties(self.index))
            self.stream = self._call(cudart.cudaStreamCreate())
        self.stream_handle = int(self.stream)

    def _call(self, result: Any) -> Any:
        """cuda-python returns (error, *values): raise on an error, else the value(s)."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA error (cuda-python): {getattr(err, 'name', err)}")
        return values[0] if len(values) == 1 else values or None

    def device_name(self) -> str:
        name = self._props.name
        return (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00")

    def compute_capability(self) -> tuple[int, int]:
        return int(self._props.major), int(self._props.minor)

    def versions(self) -> dict[str, str | None]:
        runtime = self._call(self.rt.cudaRuntimeGetVersion())
        driver = self._call(self.rt.cudaDriverGetVersion())
        return {"cuda": _version_text(runtime), "driver": _version_text(driver)}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self._call(self.rt.cudaSetDevice(self.index))
        yield

    def device(self, nbytes: int) -> DeviceBuffer:
        ptr = self._call(self.rt.cudaMalloc(max(nbytes, 1)))
        return DeviceBuffer(int(ptr), nbytes, _Release(self.rt.cudaFree, ptr))

    def host(self, nbytes: int) -> HostBuffer:
        size = max(nbytes, 1)
        ptr = self._call(self.rt.cudaMallocHost(size))
        array = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(int(ptr)))
        return HostBuffer(array, _Release(self.rt.cudaFreeHost, ptr))

    def _copy(self, dst: int, src: int, nbytes: int, kind: Any) -> None:
        self._call(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream))

    def to_device(self, dst: DeviceBuffer, src: HostBuffer, nbytes: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._copy(dst.ptr, src.array.ctypes.data, nbytes, kind)

    def to_host(self, dst: HostBuffer, src: DeviceBuffer, nbytes: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._copy(dst.array.ctypes.data, src.ptr, nbytes, kind)

    def synchronize(self) -> None:
        self._call(self.rt.cudaStreamSynchronize(self.stream))


class _Release:
    """Frees a cuda-python allocation when the buffer that owns it is garbage collected."""

    def __init__(self, free: Callable[[Any], Any], ptr: Any) -> None:
        self.free, self.ptr = free, ptr

    def __del__(self) -> None:
        try:
            self.free(self.ptr)
        except Exception:  # interpreter shutdown: the driver frees everything anyway
            pass


class TorchBuffers(CudaBuffers):
    """torch CUDA tensors as raw buffers, on a torch stream of the device."""

    name = "torch"

    def __init__(self, torch: Any, index: int) -> None:
        self.torch, self.dev = torch, torch.device("cuda", int(index))
        self.stream = torch.cuda.Stream(device=self.dev)
        self.stream_handle = int(self.stream.cuda_stream)

    def device_name(self) -> str:
        return self.torch.cuda.get_device_name(self.dev)

    def compute_capability(self) -> tuple[int, int]:
        major, minor = self.torch.cuda.get_device_capability(self.dev)
        return int(major), int(minor)

    def versions(self) -> dict[str, str | None]:
        return {"cuda": self.torch.version.cuda, "driver": None}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with self.torch.cuda.device(self.dev):
            yield

    def device(self, nbytes: int) -> DeviceBuffer:
        tensor = self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8, device=self.dev)
        return DeviceBuffer(tensor.data_ptr(), nbytes, tensor)

    def host(self, nbytes: int) -> HostBuffer:
        tensor = self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8, pin_memory=True)
        return HostBuffer(tensor.numpy(), tensor)

    def to_device(self, dst: DeviceBuffer, src: HostBuffer, nbytes: int) -> None:
        with self.torch.cuda.stream(self.stream):
            dst.owner[:nbytes].copy_(src.owner[:nbytes], non_blocking=True)

    def to_host(self, dst: HostBuffer, src: DeviceBuffer, nbytes: int) -> None:
        with self.torch.cuda.stream(self.stream):
            dst.owner[:nbytes].copy_(src.owner[:nbytes], non_blocking=True)

    def synchronize(self) -> None:
        self.stream.synchronize()


IMPLEMENTATIONS: dict[str, type[CudaBuffers]] = {
    "pycuda": PycudaBuffers,
    "cuda-python": CudaPythonBuffers,
    "torch": TorchBuffers,
}


def open_buffers(device: int = 0) -> CudaBuffers:
    """The buffer library `select_library` picks, opened on CUDA device `device`.

    Raises:
        ImportError: no buffer library can be imported.
        RuntimeError: the library cannot reach the device (no driver, bad index).
    """
    name, module = select_library()
    return IMPLEMENTATIONS[name](module, device)


def device_info(device: int = 0) -> dict[str, Any]:
    """GPU name, compute capability, CUDA runtime / driver versions and the buffer library."""
    lib = open_buffers(device)
    major, minor = lib.compute_capability()
    return {
        "gpu": lib.device_name(),
        "compute_capability": f"{major}.{minor}",
        **lib.versions(),
        "buffers": lib.name,
    }
