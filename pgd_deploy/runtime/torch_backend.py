"""`TorchBackend`: a checkpoint run in PyTorch behind the backend interface, eager or compiled,
at fp32 or fp16/bf16 autocast. torch is imported when a backend is built, so importing this
module needs only numpy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pgd_deploy.labels import class_labels
from pgd_deploy.runtime.backend_base import Backend

TORCH_PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class TorchOptions:
    """How a `TorchBackend` runs its network (its keyword options).

    Attributes:
        precision: "fp32", or "fp16" / "bf16" autocast (fp16 needs CUDA; bf16 a CUDA GPU or a
            CPU whose oneDNN has bf16 kernels). Outputs are float32 either way: box decoding and
            scores run in fp32 (`DenseDetector.decode`).
        compile: `torch.compile` the network and its decoding (`compile_mode`); the numpy
            post-processing stays outside. Compilation happens on the first call of each batch
            size, so warm up before timing.
        channels_last: NHWC weights and inputs; "auto" = on CUDA at fp16/bf16, where cuDNN's
            tensor-core convolutions are NHWC.
    """

    precision: str = "fp32"
    compile: bool = False
    compile_mode: str = "default"
    channels_last: str = "auto"


class TorchBackend(Backend):
    """A pgd-deploy checkpoint run in PyTorch (CPU or CUDA), eager or compiled, with the
    keyword options of `TorchOptions` (precision, compile, compile_mode, channels_last).

    Raises:
        ValueError: a precision this device cannot run, or autocast on a QAT checkpoint.
    """

    name = "torch"

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "auto",
        input_size: Sequence[int] | None = None,
        postprocess: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        """`postprocess`: thresholds replacing the detector's own (`postprocess_kwargs`);
        `options`: the fields of `TorchOptions`."""
        run = TorchOptions(**options)
        torch = _import_torch()
        from pgd_deploy.models import load_detector

        dev = _torch_device(torch, device)
        loaded = load_detector(path, device=dev)
        if loaded.checkpoint.get("qat"):  # a quantization-aware checkpoint runs its fake quant
            if run.precision != "fp32":
                raise ValueError(
                    f"{path}: a QAT checkpoint runs its int8 fake quant in fp32; "
                    f"precision must be fp32, got {run.precision!r}"
                )
            self.precision = "int8 fake quant"
        if input_size is None:
            data = loaded.config.data
            input_size = (_round32(data.min_size), _round32(data.max_size))
        names, ids = loaded.class_names, loaded.category_ids
        self.path = Path(path)
        self._setup(
            torch, loaded.detector, dev, input_size, names, ids, postprocess, run,
            metric=loaded.config.data.metric,
        )  # fmt: skip

    @classmethod
    def from_detector(
        cls,
        detector: Any,
        *,
        input_size: Sequence[int],
        class_names: Sequence[str],
        category_ids: Sequence[int] | None = None,
        postprocess: Mapping[str, Any] | None = None,
        metric: str = "coco",
    ) -> TorchBackend:
        """Wrap an already loaded `DenseDetector` (on its current device) without reloading it;
        `postprocess` replaces the detector's thresholds here, never in the detector; `metric`:
        how its data is evaluated (the training config's `data.metric`)."""
        torch = _import_torch()
        self = cls.__new__(cls)
        device = next(detector.parameters()).device
        names, ids = class_labels(detector.num_classes, class_names, category_ids)
        self.path = None
        self._setup(
            torch, detector.eval(), device, input_size, names, ids, postprocess, metric=metric
        )
        return self

    def _setup(
        self,
        torch: Any,
        model: Any,
        device: Any,
        input_size: Sequence[int],
        classes: list[str],
        category_ids: list[int],
        postprocess: Mapping[str, Any] | None = None,
        run: TorchOptions | None = None,
        metric: str = "coco",
    ) -> None:
        run = run or TorchOptions()
        precision, channels_last = run.precision, run.channels_last
        self.torch, self.model, self.device = torch, model, torch.device(device)
        self.autocast_dtype = _autocast_dtype(torch, precision, self.device, self.path)
        if self.autocast_dtype is not None:
            self.precision = precision
        if channels_last not in ("auto", "on", "off"):
            raise ValueError(f"channels_last: expected auto, on or off, got {channels_last!r}")
        self.channels_last = channels_last == "on" or (
            channels_last == "auto" and self.device.type == "cuda" and precision != "fp32"
        )
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.compiled = bool(run.compile)
        self.compile_mode = run.compile_mode
        self._run = self._network
        if run.compile:
            # one static graph per batch size and backend: every TorchBackend shares the code
            # of `_network`, and past dynamo's default 8 graphs a call silently runs eager
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
            self._run = torch.compile(self._network, mode=run.compile_mode, dynamic=False)
        with torch.no_grad():
            probe = model(torch.zeros(1, 3, *input_size, device=self.device))
        meta = {
            "imgsz": list(input_size),
            "class_names": classes,
            "category_ids": category_ids,
            "level_sizes": model.level_sizes(probe),
            "postprocess": {**model.postprocess_kwargs, **(postprocess or {})},
            "metric": metric,
        }
        Backend.__init__(self, meta)

    def _network(self, x: Any) -> tuple[Any, Any]:
        """The network and its decoding (what `compile` compiles): fp32 boxes and scores."""
        dtype = self.autocast_dtype
        with self.torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            outputs = self.model(x)
        boxes, scores = self.model.decode(outputs)
        return boxes.float(), scores.float()

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            boxes, scores = self._run(x)
        return {"boxes": boxes.cpu().numpy(), "scores": scores.cpu().numpy()}

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def describe(self) -> str:
        h, w = self.input_size
        extras = [self.precision]
        if self.compiled:
            extras.append(
                "compiled" + ("" if self.compile_mode == "default" else f" {self.compile_mode}")
            )
        if self.channels_last:
            extras.append("channels-last")
        return f"{self.name} ({self.device.type.upper()}) {' '.join(extras)} {h}x{w}"


def _autocast_dtype(torch: Any, precision: str, device: Any, path: Any) -> Any:
    """The autocast dtype of `precision` on `device` (None for fp32), or a ValueError saying
    why this device cannot run it."""
    where = f"{path}: " if path else ""
    if precision not in TORCH_PRECISIONS:
        raise ValueError(
            f"{where}precision: expected one of {', '.join(TORCH_PRECISIONS)}, got {precision!r}"
        )
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"{where}this GPU has no bf16 support; use fp16")
        return torch.float16 if precision == "fp16" else torch.bfloat16
    if device.type != "cpu":
        raise ValueError(f"{where}precision {precision} needs a CUDA GPU or a CPU, not {device}")
    if precision == "fp16":
        raise ValueError(f"{where}precision fp16 needs CUDA; on the CPU use bf16 or fp32")
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise ValueError(
            f"{where}precision bf16: this CPU has no bf16 kernels (oneDNN needs avx512_bf16 or "
            "AMX); use fp32"
        )
    return torch.bfloat16


def _round32(v: int) -> int:
    return -(-int(v) // 32) * 32


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError(
            "the torch backend needs PyTorch: pip install 'pgd-deploy[train]'"
        ) from None
    return torch


def _torch_device(torch: Any, device: str) -> Any:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("tensorrt"):  # ONNX Runtime's TensorRT provider: the same GPU for torch
        device = "cuda" + device[len("tensorrt") :]
    return torch.device(device)
