"""Which ONNX Runtime execution providers run a model, chosen explicitly (torch-free).

`--device` for an ONNX model: `auto` (the CUDA provider when this onnxruntime has it, else CPU),
`cpu`, `cuda[:N]` (CUDA provider, CPU for the nodes it lacks), `tensorrt[:N]` (ONNX Runtime's
TensorRT provider, then CUDA, then CPU; its first run of a shape builds an engine, which takes a
while). The list comes from `onnxruntime.get_available_providers()`. A provider being listed does
not mean it loads (its CUDA / cuDNN / TensorRT libraries may be missing), and ONNX Runtime then
falls back to the CPU with only a log line, so the session's actual providers are checked too:
asking for a GPU and getting the CPU is an error, never a silent slowdown.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
DEVICES = "auto, cpu, cuda[:N] or tensorrt[:N]"
GPU_HINT = (
    "install onnxruntime-gpu (and not onnxruntime beside it) with the CUDA, cuDNN and, for "
    "tensorrt, TensorRT libraries it was built for, or use --device cpu"
)


def parse_device(device: str) -> tuple[str, int]:
    """'cuda:1' -> ('cuda', 1).

    Raises:
        ValueError: an unknown device (the message lists the accepted ones).
    """
    kind, _, index = str(device).partition(":")
    if kind not in ("auto", "cpu", "cuda", "tensorrt") or (index and not index.isdigit()):
        raise ValueError(f"device {device!r} for ONNX Runtime: expected {DEVICES}")
    return kind, int(index or 0)


def select_providers(device: str, available: Sequence[str]) -> list[Any]:
    """The `providers=` list for `onnxruntime.InferenceSession`, most preferred first.

    Raises:
        ValueError: a GPU device was asked for and this onnxruntime has no such provider.
    """
    kind, index = parse_device(device)
    options = {"device_id": index}
    if kind == "cpu":
        return [CPU]
    if kind == "auto":
        return [(CUDA, options), CPU] if CUDA in available else [CPU]
    wanted = TENSORRT if kind == "tensorrt" else CUDA
    if wanted not in available:
        raise ValueError(
            f"device {device!r}: this onnxruntime has no {wanted} (it offers "
            f"{', '.join(available)}); {GPU_HINT}"
        )
    chain = [(TENSORRT, options)] if kind == "tensorrt" else []
    if CUDA in available:
        chain.append((CUDA, options))
    return [*chain, CPU]


def provider_name(entry: Any) -> str:
    return entry if isinstance(entry, str) else entry[0]


def check_session_providers(
    path: str | Path, device: str, requested: Sequence[Any], actual: Sequence[str]
) -> str:
    """The provider that runs the model (the session's first); refuses a silent CPU fallback.

    Raises:
        ValueError: a GPU device was asked for explicitly and the session did not get it.
    """
    wanted = provider_name(requested[0])
    if wanted != CPU and wanted not in actual:
        message = (
            f"{path}: asked for device {device!r} ({wanted}) but ONNX Runtime created the "
            f"session with {', '.join(actual)} only: the provider failed to load (see the "
            f"onnxruntime log above)"
        )
        if parse_device(device)[0] != "auto":
            raise ValueError(f"{message}; {GPU_HINT}")
        logger.warning("%s; running on %s", message, actual[0])
    return actual[0]
