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
) -> dict[str, Any]:
    """The manifest of one artifact; the keys are documented in `pgd_deploy.runtime.manifest`.

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
    """
    bmin, bopt, bmax = (int(b) for b in batch)
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
    }
