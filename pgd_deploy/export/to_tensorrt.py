"""Strongly typed TensorRT engine build from the exported ONNX (TensorRT 10 and 11, one path).

Builder -> OnnxParser (every parser error reported) -> builder config (workspace via
`set_memory_pool_limit`, `builder_optimization_level`, timing cache, optional hardware/version
compatibility) -> one optimisation profile from the batch flags -> `build_serialized_network`,
written as raw bytes (no header: trtexec, Triton and Polygraphy load it). Precision lives in the
ONNX (fp16 casts, int8 Q/DQ; `precision.py`): no precision flag is ever set (docs/deployment.md §3).
On TensorRT 10 the network is created with STRONGLY_TYPED; on 11 strong typing is always on.
For fp32 builds TF32 is disabled so the fp32 parity gate compares like with like. A
version-compatible build (VERSION_COMPATIBLE) keeps its lean runtime inside the plan, so later
TensorRT versions can load it (the runner then sets `engine_host_code_allowed`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgd_deploy.export.nms import SMALL_NMS_SM, TRT_NMS_BOXES, TRT_NMS_BOXES_SMALL
from pgd_deploy.io_utils import atomic_write_bytes
from pgd_deploy.progress import Progress

logger = logging.getLogger(__name__)

HW_COMPAT = ("none", "ampere+")


class TensorRTBuildError(RuntimeError):
    """The ONNX did not parse, or the engine did not build; the message carries TensorRT's log."""


@dataclass(frozen=True)
class BatchProfile:
    """The optimisation profile of the (only) dynamic axis, the batch."""

    min: int
    opt: int
    max: int

    def shapes(self, imgsz: Sequence[int]) -> tuple[tuple[int, ...], ...]:
        h, w = int(imgsz[0]), int(imgsz[1])
        return tuple((b, 3, h, w) for b in (self.min, self.opt, self.max))


def validate_profile(batch_min: int, batch_opt: int, batch_max: int) -> BatchProfile:
    """Check 1 <= min <= opt <= max.

    Raises:
        ValueError: naming the offending flag and the expected relation.
    """
    if batch_min < 1:
        raise ValueError(f"--batch-min / export.batch_min: expected >= 1, got {batch_min}")
    if batch_opt < batch_min:
        raise ValueError(
            f"--batch-opt / export.batch_opt: expected >= --batch-min ({batch_min}), "
            f"got {batch_opt}"
        )
    if batch_max < batch_opt:
        raise ValueError(
            f"--batch-max / export.batch_max: expected >= --batch-opt ({batch_opt}), "
            f"got {batch_max}"
        )
    return BatchProfile(batch_min, batch_opt, batch_max)


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise ImportError(
            "--format tensorrt needs the TensorRT Python package and an NVIDIA GPU: "
            "pip install 'pgd-deploy[trt]' (or export ONNX with --format onnx)"
        ) from None
    return trt


def check_plan_libraries() -> None:
    """What building and gating a plan needs, checked before any work: TensorRT, and a device
    buffer library for the runner that gates it (pycuda, cuda-python or torch with CUDA).

    Raises:
        ImportError: the message names what is missing and what to install.
    """
    import_tensorrt()
    from pgd_deploy.runtime.cuda_buffers import select_library

    try:
        select_library()
    except ImportError as err:
        raise ImportError(f"--format tensorrt gates the plan it builds, and {err}") from None


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def gpu_info(device: int = 0) -> dict[str, Any]:
    """GPU name, compute capability, CUDA runtime and driver versions of CUDA device `device`,
    through the TensorRT runner's buffer library (pycuda, else cuda-python, else torch)."""
    from pgd_deploy.runtime.cuda_buffers import device_info

    return device_info(device)


def check_nms_candidates(candidates: int, compute_capability: str) -> None:
    """Refuse in-graph NMS with more candidates than TensorRT's NMS layer considers on this GPU.

    The layer looks at the top 5000 boxes per image, 2000 on SM 5.3 and 6.2 (TensorRT operator
    docs, NMS "TopK box limit"); the graph's own TopK already caps candidates at 3839.

    Raises:
        ValueError: naming --nms-topk, the GPU's compute capability and the limit.
    """
    major, _, minor = str(compute_capability).partition(".")
    small = (int(major), int(minor or 0)) in SMALL_NMS_SM
    limit = TRT_NMS_BOXES_SMALL if small else TRT_NMS_BOXES
    if candidates > limit:
        raise ValueError(
            f"--nms-topk {candidates}: TensorRT's NMS layer considers at most {limit} boxes per "
            f"image on compute capability {compute_capability}; export again with "
            f"--nms-topk {limit} or less"
        )


def _make_logger(trt: Any) -> Any:
    """A TensorRT logger that forwards to Python logging and keeps errors for the report."""
    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.ERROR,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
        trt.ILogger.Severity.INFO: logging.DEBUG,
        trt.ILogger.Severity.VERBOSE: logging.DEBUG,
    }

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity, logging.INFO)
            if level >= logging.ERROR:
                self.errors.append(msg)
            logger.log(level, "TensorRT: %s", msg)

    return _Logger()


def _parse(trt: Any, builder: Any, trt_logger: Any, onnx_path: Path) -> Any:
    flags = 0
    if trt_major(trt) == 10 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)  # TensorRT 11: strongly typed whatever the flags
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TensorRTBuildError(
            f"{onnx_path}: TensorRT's ONNX parser reported {len(errors)} error(s):\n  "
            + "\n  ".join(errors or ["(no error recorded)"])
        )
    return network, parser


def _configure(
    trt: Any,
    builder: Any,
    *,
    precision: str,
    workspace_gb: float,
    opt_level: int,
    hw_compat: str,
    version_compatible: bool,
) -> Any:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.builder_optimization_level = int(opt_level)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if hw_compat == "ampere+":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if version_compatible:
        # The lean runtime stays in the plan: with EXCLUDE_LEAN_RUNTIME a later TensorRT could
        # only run it through IRuntime.load_runtime and the exact build's lean library.
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    return config


def check_build_options(*, hw_compat: str, opt_level: int, workspace_gb: float) -> None:
    """Validate the TensorRT flags before TensorRT is needed.

    Raises:
        ValueError: naming the flag and the expected value.
    """
    if hw_compat not in HW_COMPAT:
        raise ValueError(f"--hw-compat: expected one of {HW_COMPAT}, got {hw_compat!r}")
    if not 0 <= opt_level <= 5:
        raise ValueError(f"--builder-opt-level: expected 0..5, got {opt_level}")
    if workspace_gb <= 0:
        raise ValueError(f"--workspace: expected a positive size in GB, got {workspace_gb}")


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    *,
    input_name: str,
    imgsz: Sequence[int],
    profile: BatchProfile,
    precision: str,
    workspace_gb: float = 4.0,
    opt_level: int = 3,
    timing_cache: str = "",
    hw_compat: str = "none",
    version_compatible: bool = False,
    nms_candidates: int = 0,
) -> dict[str, Any]:
    """Build and write a plan; returns the manifest's "tensorrt" entry.

    `nms_candidates`: the in-graph NMS pre-selection (`--nms-topk`, 0 without NMS), checked
    against this GPU's NMS limit before anything is built.

    Raises:
        ImportError: tensorrt is not installed.
        ValueError: bad options (the message names the flag).
        TensorRTBuildError: parser errors (all of them) or a failed build (TensorRT's errors).
    """
    check_build_options(hw_compat=hw_compat, opt_level=opt_level, workspace_gb=workspace_gb)
    trt = import_tensorrt()
    gpu = gpu_info()
    check_nms_candidates(nms_candidates, gpu["compute_capability"])
    trt_logger = _make_logger(trt)
    builder = trt.Builder(trt_logger)
    network, _parser = _parse(trt, builder, trt_logger, Path(onnx_path))
    config = _configure(
        trt,
        builder,
        precision=precision,
        workspace_gb=workspace_gb,
        opt_level=opt_level,
        hw_compat=hw_compat,
        version_compatible=version_compatible,
    )
    opt_profile = builder.create_optimization_profile()
    lo, opt, hi = profile.shapes(imgsz)
    opt_profile.set_shape(input_name, min=lo, opt=opt, max=hi)
    config.add_optimization_profile(opt_profile)
    cache = _load_timing_cache(config, timing_cache)
    monitor = build_progress(trt)
    if monitor is not None:
        config.progress_monitor = monitor  # kept alive by `monitor` until the build returns
    plan, seconds = _serialize(builder, network, config, trt_logger)
    atomic_write_bytes(plan_path, plan)
    if cache is not None and timing_cache:
        atomic_write_bytes(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return _build_info(
        trt,
        gpu,
        precision,
        hw_compat,
        version_compatible,
        opt_level,
        workspace_gb,
        timing_cache,
        input_name,
        (lo, opt, hi),
        seconds,
    )


def build_progress(trt: Any) -> Any:
    """A `trt.IProgressMonitor` that shows the builder's phases (tactic selection can take many
    minutes) as progress bars and logs each top-level phase with its duration; None when this
    TensorRT has no progress monitor API (before 10)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class BuildProgress(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)  # the bindings require the base constructor to run
            self.bars: dict[str, Progress] = {}
            self.started: dict[str, float] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            bar = Progress(num_steps or None, f"TensorRT: {phase_name}", unit="step")
            self.bars[phase_name] = bar.__enter__()
            self.started[phase_name] = time.perf_counter()
            if parent_phase is None:
                logger.info("TensorRT build: %s ...", phase_name)

        def step_complete(self, phase_name: str, step: int) -> bool:
            if phase_name in self.bars:
                self.bars[phase_name].update(1)
            return True  # never cancel the build

        def phase_finish(self, phase_name: str) -> None:
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.__exit__(None, None, None)
            seconds = time.perf_counter() - self.started.pop(phase_name, time.perf_counter())
            logger.debug("TensorRT build: %s done in %.1f s", phase_name, seconds)

    return BuildProgress()


def _serialize(builder: Any, network: Any, config: Any, trt_logger: Any) -> tuple[bytes, float]:
    """(plan bytes, build seconds); raises TensorRTBuildError with TensorRT's errors."""
    start = time.perf_counter()
    logger.info("building the TensorRT engine (minutes: tactic selection for this GPU) ...")
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    logger.info("TensorRT engine built in %.1f s", seconds)
    if plan is None:
        raise TensorRTBuildError(
            "TensorRT build_serialized_network failed:\n  "
            + "\n  ".join(trt_logger.errors or ["(see the TensorRT log above)"])
        )
    return bytes(memoryview(plan)), seconds


def _build_info(
    trt: Any,
    gpu: dict[str, Any],
    precision: str,
    hw_compat: str,
    version_compatible: bool,
    opt_level: int,
    workspace_gb: float,
    timing_cache: str,
    input_name: str,
    shapes: tuple[Any, Any, Any],
    seconds: float,
) -> dict[str, Any]:
    """The manifest's "tensorrt" entry."""
    lo, opt, hi = shapes
    return {
        "version": trt.__version__,
        **gpu,
        "strongly_typed": True,
        "tf32": precision != "fp32",
        "hardware_compatibility": hw_compat,
        "version_compatible": bool(version_compatible),
        "builder_optimization_level": int(opt_level),
        "workspace_gb": float(workspace_gb),
        "timing_cache": timing_cache or None,
        "profile": {"input": input_name, "min": list(lo), "opt": list(opt), "max": list(hi)},
        "build_seconds": round(seconds, 1),
    }


def _load_timing_cache(config: Any, path: str) -> Any:
    """Seed the build from a timing cache file (a stale or foreign cache only costs time)."""
    if not path:
        return None
    blob = Path(path).read_bytes() if Path(path).is_file() else b""
    cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        logger.warning("timing cache %s does not match this TensorRT/GPU; starting a new one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache
