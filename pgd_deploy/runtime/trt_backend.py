"""TensorRT runner for exported plans (torch-free; tensorrt imported in the constructor).

`TrtBackend(path)` reads the plan's sidecar manifest, refuses to load it when the TensorRT version
(build number included) or the GPU's compute capability does not match what it was built for (a
plan is tied to both, triton#7188, TensorRT#1562), then runs it with name-based I/O
(`set_input_shape`, `set_tensor_address`, `execute_async_v3`), pinned host buffers and device
buffers cached per tensor. Device buffers come from pycuda, else cuda-python, else torch
(`cuda_buffers`). A version-compatible plan (`--set export.trt_version_compatible=true`) embeds
its lean runtime: it loads on the same or any later TensorRT (TensorRT "Version Compatibility"
docs: 8.6+ plans run on later runtimes, 10.x plans on 11.x), and the runtime is told to trust its
host code (`engine_host_code_allowed`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pgd_deploy.runtime.backend_base import Backend
from pgd_deploy.runtime.contract import check_io_contract, check_metadata, manifest_disagreements
from pgd_deploy.runtime.manifest import manifest_path, read_manifest
from pgd_deploy.runtime.verify import refuse_or_warn

logger = logging.getLogger(__name__)

AMPERE = (8, 0)


class EngineMismatchError(ValueError):
    """A plan built for another TensorRT version or GPU; the message says how to rebuild it."""


def _version_tuple(version: str, parts: int = 4) -> tuple[int, ...]:
    """ "10.3.0.26" -> (10, 3, 0, 26): major, minor, patch, build (as many as the text has)."""
    nums = []
    for piece in str(version).split(".")[:parts]:
        digits = "".join(c for c in piece if c.isdigit())
        nums.append(int(digits) if digits else 0)
    return tuple(nums)


def _same_version(have: str, want: str) -> bool:
    """Equal up to the build number; a side without one is compared on what both have."""
    a, b = _version_tuple(have), _version_tuple(want)
    common = min(len(a), len(b))
    if common < 4:
        logger.warning(
            "TensorRT %s vs plan built with %s: no build number on one side, compared %d parts",
            have,
            want,
            common,
        )
    return a[:common] == b[:common]


def _newer_or_same(have: str, want: str) -> bool:
    a, b = _version_tuple(have), _version_tuple(want)
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) >= b + (0,) * (width - len(b))


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

    Rules: the runtime's TensorRT version must equal the builder's, build number included
    ("10.3.0.26"; TensorRT refuses a plan from another build); a version-compatible plan accepts
    the same or any later runtime (TensorRT docs, "Version Compatibility": a plan built with 8.6 or
    later runs on later runtimes, across majors). The GPU's compute capability must equal the
    builder's, or be Ampere (8.0) or newer for an "ampere+" hardware-compatible plan.

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
    if built.get("version_compatible"):
        ok = _newer_or_same(trt_version, built["version"])
        kind = "version-compatible plan built with TensorRT"
    else:
        ok = _same_version(trt_version, built["version"])
        kind = "plan built with TensorRT"
    if not ok:
        raise EngineMismatchError(
            f"{kind} {built['version']}, this machine has TensorRT {trt_version}; "
            f"{rebuild_hint(manifest)}"
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


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as err:
        raise ImportError(
            f"the TensorRT backend needs tensorrt ({err}): pip install 'pgd-deploy[trt]'"
        ) from None
    return trt


def make_runtime(trt: Any, logger_: Any, manifest: Mapping[str, Any]) -> Any:
    """A `trt.Runtime` for this plan. A version-compatible plan carries its own lean runtime
    (host code), which TensorRT runs only when the runtime is told to trust the plan."""
    runtime = trt.Runtime(logger_)
    if manifest.get("tensorrt", {}).get("version_compatible"):
        runtime.engine_host_code_allowed = True  # our own pgd-export plan: trusted
    return runtime


class TrtBackend(Backend):
    """A TensorRT plan on one GPU (see the module docstring).

    Args:
        path: the `.plan` / `.engine` file (its `.manifest.json` must be beside it).
        device: CUDA device index.
        allow_unverified: serve a plan whose manifest disagrees with the engine's I/O, with a
            warning, instead of refusing it (`runtime.verify`).

    Raises:
        FileNotFoundError: the plan or its manifest is missing.
        EngineMismatchError: built for another TensorRT version or GPU.
        ImportError: tensorrt, or every device buffer library, is missing.
        ValueError: the plan's inputs/outputs are not the export contract.
    """

    name = "tensorrt"

    def __init__(
        self, path: str | Path, *, device: int = 0, allow_unverified: bool = False
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: TensorRT plan not found")
        meta = read_manifest(path)
        if meta is None:
            raise FileNotFoundError(
                f"{path}: no manifest {manifest_path(path).name} beside the plan (pgd-export "
                "writes one; it holds the input size, classes and build versions)"
            )
        check_metadata(path, meta)
        super().__init__(meta)
        self.path = path
        self.precision = meta.get("precision", "fp32")
        self._lock = threading.Lock()  # one execution context: one call at a time
        self._open(device)
        shapes = self._io_shapes()
        check_io_contract(path, shapes[0], shapes[1], meta)
        # check 4 of runtime.verify; dtypes not compared (a plan may run other I/O types)
        inputs, outputs = ([(n, d, None) for n, d in io] for io in shapes)
        problems = manifest_disagreements(meta, inputs, outputs)
        self.warnings = refuse_or_warn(path, problems, allow_unverified)

    def _open(self, device: int) -> None:
        """Import TensorRT and a buffer library, check the plan fits this machine, load it."""
        from pgd_deploy.runtime.cuda_buffers import open_buffers

        trt = _import_tensorrt()
        self.cuda = open_buffers(device)
        check_engine_compat(
            self.meta,
            trt_version=trt.__version__,
            compute_capability=self.cuda.compute_capability(),
        )
        self.trt, self.gpu = trt, self.cuda.device_name()
        with self.cuda.active():
            self._load(self.path.read_bytes())

    def _load(self, plan: bytes) -> None:
        trt = self.trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = make_runtime(trt, self._logger, self.meta)
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineMismatchError(f"{self.path}: TensorRT could not deserialise the plan")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input_names[0], 0)
        self.batch_range = (int(lo[0]), int(hi[0]))
        self.max_batch = self.batch_range[1]
        self.in_graph_nms = "det_boxes" in self.output_names
        self._buffers: dict[str, tuple[Any, Any]] = {}  # name -> (device, host) buffers

    def _io_shapes(self) -> tuple[list[tuple[str, list[Any]]], list[tuple[str, list[Any]]]]:
        """(inputs, outputs) as [(name, dims)], -1 for dynamic dims (the contract check)."""
        shape = self.engine.get_tensor_shape
        return (
            [(n, [int(d) for d in shape(n)]) for n in self.input_names],
            [(n, [int(d) for d in shape(n)]) for n in self.output_names],
        )

    def _buffer(self, name: str, nbytes: int) -> tuple[Any, Any]:
        """(device, pinned host) buffers of at least `nbytes` for tensor `name`, cached."""
        cached = self._buffers.get(name)
        if cached is None or cached[0].nbytes < nbytes:
            cached = (self.cuda.device(nbytes), self.cuda.host(nbytes))
            self._buffers[name] = cached
        return cached

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
            out = self._execute(images)
        return {k: v[:n] for k, v in out.items()}

    def _execute(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """One engine call on a batch inside the profile (the caller holds the lock)."""
        with self.cuda.active():
            return self._run(images)

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        lib, ctx = self.cuda, self.context
        name = self.input_names[0]
        batch = np.ascontiguousarray(images, dtype=self.dtypes[name])
        ctx.set_input_shape(name, tuple(batch.shape))
        device, host = self._buffer(name, batch.nbytes)
        host.view(batch.shape, batch.dtype)[...] = batch
        lib.to_device(device, host, batch.nbytes)
        ctx.set_tensor_address(name, device.ptr)
        shapes = {}
        for out in self.output_names:
            shapes[out] = tuple(int(d) for d in ctx.get_tensor_shape(out))
            nbytes = int(np.prod(shapes[out])) * self.dtypes[out].itemsize
            ctx.set_tensor_address(out, self._buffer(out, nbytes)[0].ptr)
        if not ctx.execute_async_v3(stream_handle=lib.stream_handle):
            raise RuntimeError(f"{self.path}: TensorRT execution failed (see the TensorRT log)")
        for out, shape in shapes.items():
            device, host = self._buffers[out]
            lib.to_host(host, device, int(np.prod(shape)) * self.dtypes[out].itemsize)
        lib.synchronize()
        views = {
            out: self._buffers[out][1].view(shape, self.dtypes[out])
            for out, shape in shapes.items()
        }
        return {
            out: (view.astype(np.float32) if view.dtype == np.float16 else view.copy())
            for out, view in views.items()
        }

    def describe(self) -> str:
        return f"{super().describe()} on {self.gpu}"
