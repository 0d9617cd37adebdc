"""Inference backends behind one interface: PyTorch checkpoint, ONNX Runtime, TensorRT.

Every backend letterboxes with `runtime.preprocess`, runs its model on the fixed contract
(images [B, 3, H, W] -> boxes [B, N, 4], scores [B, N, C]) and post-processes with
`runtime.postprocess`, so detections from different backends are comparable like for like.

Heavy libraries are imported inside the constructors: importing this module needs only numpy/PIL.
The interface, `Backend`, lives in `runtime.backend_base` (imported here too) so that the PyTorch
and TensorRT backends build on it without importing this module.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pgd_deploy.runtime.backend_base import Backend
from pgd_deploy.runtime.contract import (
    ORT_DTYPES,
    check_io_contract,
    check_metadata,
    check_output_shapes,
    manifest_disagreements,
)
from pgd_deploy.runtime.manifest import read_manifest
from pgd_deploy.runtime.providers import check_session_providers, select_providers

ONNX_METADATA_KEY = "pgd_deploy"  # ONNX metadata_props entry holding the manifest essentials


def _onnx_meta(session: Any) -> dict[str, Any]:
    props = session.get_modelmeta().custom_metadata_map
    if ONNX_METADATA_KEY in props:
        return json.loads(props[ONNX_METADATA_KEY])
    return {}


class OrtBackend(Backend):
    """An exported ONNX model in ONNX Runtime, on the providers `device` asks for.

    Args:
        path: the `.onnx` file (its manifest beside it, or the metadata pgd-export stores in it).
        device: auto, cpu, cuda[:N] or tensorrt[:N] (`runtime.providers`).
        threads: intra-op threads (0 = ONNX Runtime's default).
        meta: metadata to use instead of the manifest (the export's own dense twin).
        allow_unverified: serve a model whose manifest disagrees with what the model declares
            (its I/O, its embedded metadata), with a warning, instead of refusing it.

    Attributes:
        provider: the execution provider that runs the model (e.g. "CUDAExecutionProvider").

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a loadable ONNX model, not the export contract (the message names the
            file and what differs), or a GPU device this onnxruntime cannot provide.
        UnverifiedArtifactError: its manifest disagrees with the model (not `allow_unverified`).
    """

    name = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "auto",
        threads: int = 0,
        meta: dict[str, Any] | None = None,
        allow_unverified: bool = False,
    ) -> None:
        path = Path(path)
        self.session, self.provider = _open_session(path, device, threads)
        manifest = None if meta else read_manifest(path)
        meta = dict(meta or manifest or _onnx_meta(self.session))
        inputs = [(i.name, list(i.shape)) for i in self.session.get_inputs()]
        self._declared = {o.name: list(o.shape) for o in self.session.get_outputs()}
        check_metadata(path, meta)
        check_io_contract(path, inputs, list(self._declared.items()), meta)
        super().__init__(meta)
        if manifest is not None:
            self.warnings = self._check_manifest(path, manifest, allow_unverified)
        self.path = path
        self.precision = meta.get("precision", "fp32")
        self.max_batch = int(meta.get("batch", {}).get("max", 64))
        self.input_name = self.session.get_inputs()[0].name
        self.input_dtype = (
            np.float16 if "float16" in self.session.get_inputs()[0].type else np.float32
        )
        self.output_names = list(self._declared)
        self.in_graph_nms = "det_boxes" in self.output_names
        self.providers = self.session.get_providers()

    def _check_manifest(
        self, path: Path, manifest: dict[str, Any], allow_unverified: bool
    ) -> list[str]:
        """Check 4 of `runtime.verify`: the manifest agrees with the model's own I/O and the
        metadata pgd-export stored inside it."""
        from pgd_deploy.runtime.verify import refuse_or_warn

        def tensors(values: Any) -> list[tuple[str, list[Any], str | None]]:
            return [(v.name, list(v.shape), ORT_DTYPES.get(v.type)) for v in values]

        problems = manifest_disagreements(
            manifest,
            tensors(self.session.get_inputs()),
            tensors(self.session.get_outputs()),
            embedded=_onnx_meta(self.session),
        )
        return refuse_or_warn(path, problems, allow_unverified)

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        feed = {self.input_name: np.ascontiguousarray(images, dtype=self.input_dtype)}
        outs = dict(zip(self.output_names, self.session.run(self.output_names, feed)))
        if self._declared:  # once: the model computes the dims it declares
            check_output_shapes(self.path, self._declared, outs)
            self._declared = {}
        return {
            name: (out.astype(np.float32) if out.dtype == np.float16 else out)
            for name, out in outs.items()
        }

    def describe(self) -> str:
        h, w = self.input_size
        return f"{self.name} ({self.provider}) {self.precision} {h}x{w}"


def _open_session(path: Path, device: str, threads: int) -> tuple[Any, str]:
    """(InferenceSession on the providers `device` asks for, the provider that runs it)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError(
            "the ONNX backend needs onnxruntime: pip install 'pgd-deploy[serve]' "
            "(GPU: pip install onnxruntime-gpu)"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ONNX model not found")
    providers = select_providers(device, ort.get_available_providers())
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types
        raise ValueError(f"{path}: ONNX Runtime cannot load this model: {err}") from None
    return session, check_session_providers(path, device, providers, session.get_providers())


def load_backend(
    path: str | Path,
    *,
    device: str = "auto",
    input_size: Sequence[int] | None = None,
    precision: str = "fp32",
    compile: bool = False,
    compile_mode: str = "default",
    channels_last: str = "auto",
    allow_unverified: bool = False,
) -> Backend:
    """Open an artifact by its extension (and manifest): .pt -> PyTorch, .onnx -> ONNX Runtime,
    .plan/.engine -> TensorRT.

    Args:
        device: auto, cpu, cuda[:N] or tensorrt[:N] (ONNX: the execution providers, see
            `runtime.providers`; a plan or a checkpoint: GPU N).
        precision, compile, compile_mode, channels_last: how a checkpoint runs (`TorchBackend`);
            an export's precision was fixed when it was exported.
        allow_unverified: an export whose manifest disagrees with the model is served with a
            warning instead of refused (the checks before loading: `runtime.verify`).

    Raises:
        ValueError: an unknown extension (the message lists the known ones), an artifact that
            is not the export contract (`runtime.contract`), or torch settings for an export.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        from pgd_deploy.runtime.torch_backend import TorchBackend

        return TorchBackend(
            path,
            device=device,
            input_size=input_size,
            precision=precision,
            compile=compile,
            compile_mode=compile_mode,
            channels_last=channels_last,
        )
    if precision != "fp32" or compile:
        raise ValueError(
            f"{path}: precision {precision}{' and compile' if compile else ''} apply to "
            "checkpoints (.pt) run in PyTorch; an export's precision is fixed when it is "
            "exported (pgd-export --precision)"
        )
    if suffix == ".onnx":
        return OrtBackend(path, device=device, allow_unverified=allow_unverified)
    if suffix in (".plan", ".engine"):
        from pgd_deploy.runtime import trt_backend

        index = device.partition(":")[2]  # "cuda:1" / "tensorrt:1": GPU 1
        gpu = int(index) if index.isdigit() else 0
        return trt_backend.TrtBackend(path, device=gpu, allow_unverified=allow_unverified)
    raise ValueError(
        f"{path}: unknown artifact type {suffix!r}; expected a checkpoint (.pt), an ONNX model "
        "(.onnx) or a TensorRT plan (.plan/.engine) with its .manifest.json"
    )
