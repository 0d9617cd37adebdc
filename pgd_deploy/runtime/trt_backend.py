"""TensorRT runner for exported plans, with pycuda device buffers (torch-free).

`TrtBackend(path)` reads the plan's sidecar manifest, refuses to load it when the TensorRT version
or the GPU's compute capability does not match what it was built for (a plan is tied to both,
triton#7188, TensorRT#1562), then runs it with name-based I/O (`set_input_shape`,
`set_tensor_address`, `execute_async_v3`), pinned host buffers and device buffers cached per shape.
tensorrt and pycuda are imported inside the constructor: importing this module needs only numpy.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pgd_deploy.runtime.backends import Backend
from pgd_deploy.runtime.manifest import manifest_path, read_manifest

logger = logging.getLogger(__name__)

AMPERE = (8, 0)


class EngineMismatchError(ValueError):
    """A plan built for another TensorRT version or GPU; the message says how to rebuild it."""


def _version_tuple(version: str, parts: int = 3) -> tuple[int, ...]:
    nums = []
    for piece in str(version).split(".")[:parts]:
        digits = "".join(c for c in piece if c.isdigit())
        nums.append(int(digits) if digits else 0)
    return tuple(nums + [0] * (parts - len(nums)))


def _cc_tuple(cc: Any) -> tuple[int, int]:
    if isinstance(cc, (list, tuple)):
        return int(cc[0]), int(cc[1])
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


def rebuild_hint(manifest: Mapping[str, Any]) -> str:
    """The `pgd-export` command that rebuilds this plan on the current machine."""
    source = manifest.get("source", {}).get("checkpoint", "CHECKPOINT.pt")
    precision = manifest.get("precision", "fp32")
    h, w = manifest.get("imgsz", [800, 1344])
    batch = manifest.get("batch", {})
    return (
        f"rebuild with pgd-export --checkpoint {source} --format tensorrt --precision {precision} "
        f"--imgsz {h}x{w} --batch-min {batch.get('min', 1)} --batch-opt {batch.get('opt', 1)} "
        f"--batch-max {batch.get('max', 1)} on this machine"
    )


def check_engine_compat(
    manifest: Mapping[str, Any], *, trt_version: str, compute_capability: Any
) -> None:
    """Refuse a plan that this TensorRT / GPU cannot run, before deserialising it.

    Rules: the runtime's TensorRT major.minor.patch must equal the builder's (a version-compatible
    plan accepts a runtime of the same major that is not older); the GPU's compute capability must
    equal the builder's, or be Ampere (8.0) or newer for an "ampere+" hardware-compatible plan.

    Args:
        manifest: the plan's manifest (its "tensorrt" entry is checked).
        trt_version: the runtime's `tensorrt.__version__`.
        compute_capability: the GPU's (major, minor) or "major.minor".

    Raises:
        EngineMismatchError: naming both versions and the `pgd-export` command that rebuilds it.
        ValueError: the manifest has no "tensorrt" entry (not a pgd-export plan manifest).
    """
    built = manifest.get("tensorrt")
    if not isinstance(built, Mapping) or "version" not in built:
        raise ValueError(
            "plan manifest has no 'tensorrt' entry with the builder's version; "
            f"{rebuild_hint(manifest)}"
        )
    have, want = _version_tuple(trt_version), _version_tuple(built["version"])
    if built.get("version_compatible"):
        ok = have[0] == want[0] and have >= want
    else:
        ok = have == want
    if not ok:
        raise EngineMismatchError(
            f"plan built with TensorRT {built['version']}, this machine has TensorRT "
            f"{trt_version}; {rebuild_hint(manifest)}"
        )
    gpu_cc = _cc_tuple(compute_capability)
    built_cc = _cc_tuple(built.get("compute_capability", "0.0"))
    hw = built.get("hardware_compatibility", "none")
    ok = gpu_cc >= AMPERE if hw == "ampere+" else gpu_cc == built_cc
    if not ok:
        where = built.get("gpu", "another GPU")
        raise EngineMismatchError(
            f"plan built for compute capability {built_cc[0]}.{built_cc[1]} ({where}, hardware "
            f"compatibility {hw}), this GPU is {gpu_cc[0]}.{gpu_cc[1]}; {rebuild_hint(manifest)}"
        )


def _import_trt() -> tuple[Any, Any]:
    try:
        import pycuda.driver as cuda
        import tensorrt as trt
    except ImportError as err:
        raise ImportError(
            f"the TensorRT backend needs tensorrt and pycuda ({err}): pip install 'pgd-deploy[trt]'"
        ) from None
    return trt, cuda


class TrtBackend(Backend):
    """A TensorRT plan on one GPU (see the module docstring).

    Args:
        path: the `.plan` / `.engine` file (its `.manifest.json` must be beside it).
        device: CUDA device index.

    Raises:
        FileNotFoundError: the plan or its manifest is missing.
        EngineMismatchError: built for another TensorRT version or GPU.
        ImportError: tensorrt or pycuda is not installed.
    """

    name = "tensorrt"

    def __init__(self, path: str | Path, *, device: int = 0) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: TensorRT plan not found")
        meta = read_manifest(path)
        if meta is None:
            raise FileNotFoundError(
                f"{path}: no manifest {manifest_path(path).name} beside the plan (pgd-export "
                "writes one; it holds the input size, classes and build versions)"
            )
        trt, cuda = _import_trt()
        cuda.init()
        dev = cuda.Device(device)
        check_engine_compat(
            meta, trt_version=trt.__version__, compute_capability=dev.compute_capability()
        )
        super().__init__(meta)
        self.path, self.trt, self.cuda = path, trt, cuda
        self.precision = meta.get("precision", "fp32")
        self.gpu = dev.name()
        self._lock = threading.Lock()  # one execution context: one call at a time
        self._ctx = dev.retain_primary_context()  # shared with any other CUDA user in the process
        self._ctx.push()
        try:
            self._load(path.read_bytes())
        finally:
            cuda.Context.pop()

    def _load(self, plan: bytes) -> None:
        trt, cuda = self.trt, self.cuda
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineMismatchError(f"{self.path}: TensorRT could not deserialise the plan")
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input_names[0], 0)
        self.batch_range = (int(lo[0]), int(hi[0]))
        self.max_batch = self.batch_range[1]
        self.in_graph_nms = "det_boxes" in self.output_names
        self._buffers: dict[str, tuple[int, Any, Any]] = {}  # name -> (nbytes, device, host)

    def _buffer(self, name: str, shape: tuple[int, ...]) -> tuple[Any, np.ndarray]:
        dtype = self.dtypes[name]
        nbytes = int(np.prod(shape)) * dtype.itemsize
        cached = self._buffers.get(name)
        if cached is None or cached[0] < nbytes:
            device = self.cuda.mem_alloc(max(nbytes, 1))
            host = self.cuda.pagelocked_empty(int(np.prod(shape)), dtype)
            cached = (nbytes, device, host)
            self._buffers[name] = cached
        host = cached[2][: int(np.prod(shape))].reshape(shape)
        return cached[1], host

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run the plan on float32 [B, 3, H, W].

        Batches above the profile's max are split; batches below its min are zero-padded (the
        padding's outputs are dropped), so any B works with the same results.
        """
        lo, hi = self.batch_range
        if len(images) > hi:
            parts = [self.infer(images[i : i + hi]) for i in range(0, len(images), hi)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        n = len(images)
        if n < lo:
            pad = np.zeros((lo - n, *images.shape[1:]), dtype=images.dtype)
            images = np.concatenate([images, pad])
        with self._lock:
            self._ctx.push()
            try:
                out = self._run(images)
            finally:
                self.cuda.Context.pop()
        return {k: v[:n] for k, v in out.items()}

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        cuda, ctx, stream = self.cuda, self.context, self.stream
        name = self.input_names[0]
        batch = np.ascontiguousarray(images, dtype=self.dtypes[name])
        ctx.set_input_shape(name, tuple(batch.shape))
        device, host = self._buffer(name, tuple(batch.shape))
        host[...] = batch
        cuda.memcpy_htod_async(device, host, stream)
        ctx.set_tensor_address(name, int(device))
        hosts = {}
        for out in self.output_names:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(out))
            device, hosts[out] = self._buffer(out, shape)
            ctx.set_tensor_address(out, int(device))
        if not ctx.execute_async_v3(stream_handle=stream.handle):
            raise RuntimeError(f"{self.path}: TensorRT execution failed (see the TensorRT log)")
        for out, host in hosts.items():
            cuda.memcpy_dtoh_async(host, int(self._buffers[out][1]), stream)
        stream.synchronize()
        return {
            out: (host.astype(np.float32) if host.dtype == np.float16 else host.copy())
            for out, host in hosts.items()
        }

    def describe(self) -> str:
        return f"{super().describe()} on {self.gpu}"
