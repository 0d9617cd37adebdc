"""The sidecar manifest written beside every exported artifact (torch-free).

`model.onnx` -> `model.manifest.json`, `model.plan` -> `model.manifest.json`. The artifact itself
stays byte-clean (no header in a plan file), so trtexec and Triton load it unchanged.

Keys every manifest has (the export stage adds more: versions, gates, provenance):
    format: "onnx" | "tensorrt"; precision: "fp32" | "fp16" | "int8"
    status: "passed" | "failed" (gate results) | "unchecked" (exported without gates)
    imgsz: [H, W]; batch: {"min", "opt", "max"}; level_sizes: [locations per FPN level]
    class_names: [...]; category_ids: [...]
    inputs / outputs: [{"name", "dtype", "shape"}]   (-1 = dynamic batch)
    preprocess: {"letterbox": "top-left", "mean", "std", "pad_value": 0.0, "color": "RGB"}
    postprocess: {"score_thresh", "nms_thresh", "topk_candidates", "max_det"}
    nms: {"mode": "none" | "onnx", "max_det", "conf", "iou"}
    int8_target: "cpu" | "tensorrt" (int8 artifacts only: the Q/DQ rules, see export/qdq.py)
Added by `pgd-export` (see `pgd_deploy.export.manifest`): sha256 (of the artifact), recipe
(precision conversion, fp32 nodes, calibration set), source (checkpoint path, sha256, training
config, metrics), versions, gates (results of the three gates), export_config; plans also carry
tensorrt {version, gpu, compute_capability, cuda, driver, hardware_compatibility,
version_compatible, profile, ...} and onnx {path, sha256}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pgd_deploy.io_utils import write_json

SUFFIX = ".manifest.json"


def manifest_path(artifact: str | Path) -> Path:
    artifact = Path(artifact)
    return artifact.with_name(artifact.stem + SUFFIX)


def read_manifest(artifact: str | Path) -> dict[str, Any] | None:
    """The manifest beside `artifact`, or None when there is none.

    Raises:
        ValueError: the manifest exists but is not UTF-8 JSON holding an object (the message
            names the file and what was expected).
    """
    path = manifest_path(artifact)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a manifest: not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid manifest JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise ValueError(
            f"{path}: not a manifest: expected a JSON object with 'status', 'format', ..., "
            f"got a JSON {type(manifest).__name__}"
        )
    return manifest


def write_manifest(artifact: str | Path, manifest: dict[str, Any]) -> Path:
    return write_json(manifest_path(artifact), manifest)
