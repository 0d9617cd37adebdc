"""Building the sidecar manifest of an exported artifact (the deployable "model card").

The manifest sits beside the artifact (`model.onnx` -> `model.manifest.json`, see
`pgd_deploy.runtime.manifest`), so plan files stay byte-clean. It records what a consumer needs to
run the artifact (input size, preprocessing, classes, outputs, NMS settings, batch profile) and the
provenance a reviewer needs to trust it (source checkpoint hash and training config, versions,
GPU, precision recipe, gate results). Only the standard library is imported at module level.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pgd_deploy.io_utils import file_sha256
from pgd_deploy.runtime.manifest import write_manifest
from pgd_deploy.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD

MANIFEST_VERSION = 1
STATUS_PASSED, STATUS_FAILED, STATUS_UNCHECKED = "passed", "failed", "unchecked"

PREPROCESS = {
    "letterbox": "top-left",  # image at the top-left, padding at the bottom and right
    "resize": "bilinear, aspect ratio kept (PIL)",
    "color": "RGB",
    "scale": "0-255",
    "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD),
    "pad_value": 0.0,  # in normalised units (= the mean colour)
    "layout": "NCHW float32",
}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def software_versions() -> dict[str, str | None]:
    """Versions of the libraries that produced (or will run) an artifact, without importing them."""
    versions: dict[str, str | None] = {
        "pgd_deploy": _version("pgd-deploy"),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "onnxslim": _version("onnxslim"),
        "onnxconverter_common": _version("onnxconverter-common"),
    }
    torch = sys.modules.get("torch")  # only when already imported by the export
    if torch is not None:
        versions["torch_cuda"] = torch.version.cuda
    return versions


# The meaning of each axis of the contract's tensors (the manifest's "axes", config comments).
AXES = {
    "images": ["batch", "channels", "height", "width"],
    "boxes": ["batch", "locations", "xyxy"],
    "scores": ["batch", "locations", "classes"],
    "num_dets": ["batch", "count"],
    "det_boxes": ["batch", "max_det", "xyxy"],
    "det_scores": ["batch", "max_det"],
    "det_classes": ["batch", "max_det"],
}


def describe_io(model: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inputs and outputs of an ONNX ModelProto as [{"name", "dtype", "shape", "axes"}]
    (shape -1 = dynamic: only the batch axis of a pgd-export model)."""
    import onnx

    def one(value: Any) -> dict[str, Any]:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        entry = {"name": value.name, "dtype": dtype, "shape": dims}
        if len(AXES.get(value.name, [])) == len(dims):
            entry["axes"] = AXES[value.name]
        return entry

    return [one(v) for v in model.graph.input], [one(v) for v in model.graph.output]


def source_info(path: str | Path, sha256: str, state: dict[str, Any]) -> dict[str, Any]:
    """Provenance of the source checkpoint: path, hash, iteration, metrics and training config."""
    return {
        "checkpoint": str(path),
        "sha256": sha256,
        "iteration": state.get("iteration"),
        "epoch": state.get("epoch"),
        "metrics": state.get("metrics") or {},
        "train_config": state.get("config") or {},
    }


def build_manifest(
    *,
    fmt: str,
    precision: str,
    imgsz: Sequence[int],
    batch: Sequence[int],
    level_sizes: Sequence[int],
    class_names: Sequence[str],
    category_ids: Sequence[int],
    postprocess: dict[str, Any],
    nms: dict[str, Any],
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    source: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
    status: str = STATUS_UNCHECKED,
    int8_target: str | None = None,
    gate_images: str | None = None,
    export_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of one artifact; the keys are documented in `pgd_deploy.runtime.manifest`.

    The one place a manifest is assembled: `plan_manifest`, `dense_twin_manifest` and
    `record_gates` derive from or complete what this returns.

    Args:
        fmt: "onnx" or "tensorrt".
        precision: "fp32", "fp16" or "int8".
        imgsz: (H, W) letterbox size.
        batch: (min, opt, max) batch profile.
        level_sizes: locations per FPN level (sums to N).
        postprocess: score_thresh, nms_thresh, topk_candidates, max_det (host-side NMS).
        nms: {"mode": "none" | "onnx", "max_det", "conf", "iou"}.
        inputs, outputs: from `describe_io`.
        source: from `source_info`.
        recipe: how the precision was obtained (converter, excluded nodes, calibration set).
        status: "passed", "failed" or "unchecked" (no gates ran).
        int8_target: "cpu" or "tensorrt" for an int8 artifact (recorded only then).
        gate_images: where the gate images came from.
        export_config: the export job (`to_dict(ExportJob)`).
    """
    bmin, bopt, bmax = (int(b) for b in batch)
    extra: dict[str, Any] = {}
    if int8_target is not None:
        extra["int8_target"] = int8_target
    if gate_images is not None:
        extra["gate_images"] = gate_images
    if export_config is not None:
        extra["export_config"] = export_config
    return {
        "manifest_version": MANIFEST_VERSION,
        "format": fmt,
        "precision": precision,
        "status": status,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "imgsz": [int(imgsz[0]), int(imgsz[1])],
        "batch": {"min": bmin, "opt": bopt, "max": bmax},
        "level_sizes": [int(n) for n in level_sizes],
        "num_locations": int(sum(level_sizes)),
        "class_names": list(class_names),
        "category_ids": [int(c) for c in category_ids],
        "inputs": inputs,
        "outputs": outputs,
        "preprocess": dict(PREPROCESS),
        "postprocess": dict(postprocess),
        "nms": dict(nms),
        "recipe": recipe or {},
        "versions": software_versions(),
        "source": source or {},
        "gates": {},
        **extra,
    }


def plan_manifest(
    onnx_path: Path, onnx_manifest: dict[str, Any], info: dict[str, Any], plan: Path
) -> dict[str, Any]:
    """The manifest of a TensorRT plan built from a gated ONNX: the ONNX's, with the build
    information (`info`), the plan's hash and the ONNX it came from; not yet gated."""
    manifest = {**onnx_manifest, "format": "tensorrt", "tensorrt": info, "gates": {}}
    manifest.update(status=STATUS_UNCHECKED, sha256=file_sha256(plan))
    manifest["onnx"] = {"path": str(onnx_path), "sha256": file_sha256(onnx_path)}
    return manifest


def dense_twin_manifest(manifest: dict[str, Any], outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest of an NMS artifact's dense twin (the same network before NMS, with these
    `outputs` from `describe_io`; gated alongside, never shipped)."""
    return {**manifest, "outputs": outputs, "nms": {"mode": "none"}}


def record_gates(
    path: Path,
    manifest: dict[str, Any],
    report: Any,
    runtime: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Complete an artifact's manifest with its gate results (`gates.GateReport`): status,
    gates and the artifact's sha256; written beside `path`."""
    manifest["status"] = STATUS_PASSED if report.passed else STATUS_FAILED
    manifest["gates"] = {"runtime": runtime, **report.to_dict(), **(extra or {})}
    manifest["sha256"] = file_sha256(path)
    write_manifest(path, manifest)
    return manifest
