"""Triton model repository for an exported artifact, and a strict parser to verify its config.

Layout (docs/deployment.md §7): `<repo>/<name>/config.pbtxt`, `<repo>/<name>/1/model.onnx` (platform
`onnxruntime_onnx`) or `1/model.plan` (`tensorrt_plan`), the manifest beside the model and, as
compact JSON, in the config's `parameters`, plus `<repo>/README.md` with the server command, the
container tag matching the plan's TensorRT version (a plan only loads in a Triton built on the
same TensorRT, triton#7188) and a `perf_analyzer` command. Inputs and outputs are explicit, taken
from the artifact's manifest, so a mismatch fails at load time instead of being auto-completed.
The written config is parsed back by `pbtxt.parse_pbtxt` (a strict text-format parser) and checked
by `pbtxt.validate_config` against the manifest before the command reports success.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pgd_deploy.export.pbtxt import (
    DATA_TYPES,
    MANIFEST_PARAMETER,
    PLATFORMS,
    PbtxtError,
    parse_pbtxt,
    read_repository_config,
    validate_config,
)
from pgd_deploy.io_utils import atomic_copy, atomic_write_text
from pgd_deploy.runtime.manifest import write_manifest
from pgd_deploy.runtime.verify import check_vouches, same_file_as_manifest

# Every export's name (its file stem, and the model name in a Triton repository): letters, digits,
# '_', '.', '-'; no path separator; no leading '.' (hidden, or '..') or '-' (read as an option)
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
NAME_RULE = "letters, digits, '_', '.', '-', not starting with '.' or '-'"

# Triton containers by TensorRT major.minor (NGC release notes; a plan needs the same version).
# Assumed, not probed: the README shows how to confirm inside the container. Versions past the
# table (tensorrt>=10.0 also installs 11.x) get a tag the user sets: `container_tag`.
TRITON_FOR_TRT = {
    "10.0": "24.05",
    "10.1": "24.06",
    "10.2": "24.07",
    "10.3": "24.08",
    "10.4": "24.09",
    "10.5": "24.10",
    "10.6": "24.11",
    "10.7": "24.12",
    "10.8": "25.01",
    "10.9": "25.03",
}
ONNX_TRITON_TAG = TRITON_FOR_TRT["10.9"]  # ONNX models: any recent release works
TAG_VARIABLE = "TRITON_TAG"
SUPPORT_MATRIX = "https://docs.nvidia.com/deeplearning/frameworks/support-matrix/index.html"
VERSION_COMPAT_FLAG = "--backend-config=tensorrt,version-compatible=true"


def container_tag(trt_version: str | None) -> tuple[str, bool]:
    """(Triton image, whether the tag is known) for a plan's TensorRT version (None: ONNX).

    An unknown version gives `${TRITON_TAG:?...}`: the README's commands stay runnable, and the
    shell stops with the reason when the variable is not set.
    """
    if not trt_version:
        return f"nvcr.io/nvidia/tritonserver:{ONNX_TRITON_TAG}-py3", True
    key = ".".join(str(trt_version).split(".")[:2])
    if key in TRITON_FOR_TRT:
        return f"nvcr.io/nvidia/tritonserver:{TRITON_FOR_TRT[key]}-py3", True
    need = f"set {TAG_VARIABLE} to the Triton release built on TensorRT {key}"
    return f"nvcr.io/nvidia/tritonserver:${{{TAG_VARIABLE}:?{need}}}-py3", False


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _tensor_block(entry: Mapping[str, Any], batched: bool) -> str:
    dims = [int(d) for d in (entry["shape"][1:] if batched else entry["shape"])]
    if entry["dtype"] not in DATA_TYPES:
        raise ValueError(f"tensor '{entry['name']}': dtype {entry['dtype']} has no Triton type")
    if any(d < 1 for d in dims):
        raise ValueError(
            f"tensor '{entry['name']}': dims {entry['shape']} have a wildcard beyond the batch "
            "axis, so Triton could not check the model against the config at load time; "
            "re-export with pgd-export (it fixes every dim but the batch)"
        )
    axes = list(entry.get("axes", []))[1 if batched else 0 :]
    note = f"  # {', '.join(axes)}" if len(axes) == len(dims) else ""
    return (
        "  {\n"
        f"    name: {_quote(entry['name'])}\n"
        f"    data_type: {DATA_TYPES[entry['dtype']]}\n"
        f"    dims: [ {', '.join(str(d) for d in dims)} ]{note}\n"
        "  }"
    )


def render_config(
    name: str, manifest: Mapping[str, Any], *, max_batch_size: int, instances: int = 1
) -> str:
    """config.pbtxt text for the artifact described by `manifest`."""
    platform, _ = PLATFORMS[manifest["format"]]
    kind = "KIND_GPU" if manifest["format"] == "tensorrt" else "KIND_AUTO"
    inputs = ",\n".join(_tensor_block(t, True) for t in manifest["inputs"])
    outputs = ",\n".join(_tensor_block(t, True) for t in manifest["outputs"])
    compact = json.dumps(manifest, separators=(",", ":"), sort_keys=True)
    return (
        f"# Generated by pgd-export from {manifest.get('source', {}).get('checkpoint', '?')}\n"
        f"name: {_quote(name)}\n"
        f"platform: {_quote(platform)}\n"
        f"max_batch_size: {int(max_batch_size)}\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        f"instance_group [\n  {{\n    count: {int(instances)}\n    kind: {kind}\n  }}\n]\n"
        "dynamic_batching {\n  max_queue_delay_microseconds: 100\n}\n"
        "version_policy: { latest: { num_versions: 1 } }\n"
        "parameters {\n"
        f"  key: {_quote(MANIFEST_PARAMETER)}\n"
        f"  value: {{ string_value: {_quote(compact)} }}\n"
        "}\n"
    )


def _serve_notes(manifest: Mapping[str, Any]) -> tuple[str, str, str]:
    """(version-lock paragraph, image, extra tritonserver flags) for the README."""
    built = manifest.get("tensorrt", {})
    trt = built.get("version")
    image, known = container_tag(trt)
    if not trt:
        lock = (
            f"ONNX models are not tied to a TensorRT version; any recent Triton container works "
            f"(`{image}` below)."
        )
        return lock, image, ""
    if built.get("version_compatible"):
        lock = (
            f"The plan is version-compatible (built with TensorRT {trt}): a Triton on TensorRT "
            f"{trt} or later loads it with `{VERSION_COMPAT_FLAG}` (set below). Triton then runs "
            "the lean runtime stored in the plan: serve only plans you built."
        )
        return lock, image, f" \\\n    {VERSION_COMPAT_FLAG}"
    lock = f"The plan was built with TensorRT {trt}; Triton loads it only with the same TensorRT"
    if known:
        lock += f", i.e. `{image}`."
    else:
        key = ".".join(str(trt).split(".")[:2])
        lock += (
            f". This TensorRT is newer than pgd-export's table, so set the tag yourself: find "
            f"the release built on TensorRT {key} in the Frameworks Support Matrix "
            f"({SUPPORT_MATRIX}), then `export {TAG_VARIABLE}=<that YY.MM>`; the commands below "
            f"stop with this reason while {TAG_VARIABLE} is unset. Or build the plan with the "
            "TensorRT of the container you already run (`pip install tensorrt==<its version>`)."
        )
    lock += " Confirm inside the container with `ls /usr/lib/x86_64-linux-gnu/libnvinfer.so.*`."
    return lock, image, ""


def render_readme(name: str, manifest: Mapping[str, Any], *, repo: Path) -> str:
    """The repository README: how to serve it and how to measure it."""
    h, w = manifest["imgsz"]
    lock, image, flags = _serve_notes(manifest)
    sdk = image.replace("-py3", "-py3-sdk")
    outputs = ", ".join(f"`{o['name']}` {o['dtype']} {o['shape']}" for o in manifest["outputs"])
    return f"""# Triton model repository: {name}

Generated by `pgd-export --format triton`. Gates: **{manifest.get("status", "unchecked")}**
(see `{name}/1/model.manifest.json`).

- input `images` float32 [B, 3, {h}, {w}]: RGB, letterboxed to {h}x{w} (image top-left, zero
  padding bottom-right), normalised with mean {manifest["preprocess"]["mean"]} and std
  {manifest["preprocess"]["std"]} (0-255 scale). `pgd_deploy.runtime.preprocess` does exactly this.
- outputs: {outputs} (B = batch; boxes are xyxy pixels of the {h}x{w} input).
- batch: 1 to {manifest["batch"]["max"]} (dynamic batching on).

## Serve

{lock}

```bash
docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 \\
  -v {repo.resolve()}:/models {image} \\
  tritonserver --model-repository=/models{flags}
```

## Measure

```bash
docker run --rm --net host {sdk} \\
  perf_analyzer -m {name} -i grpc -u localhost:8001 -b 1 --concurrency-range 1:8 --percentile=95
```
"""


def write_repository(
    repo: str | Path,
    name: str,
    artifact: str | Path,
    manifest: Mapping[str, Any],
    *,
    max_batch_size: int,
    instances: int = 1,
) -> Path:
    """Write `<repo>/<name>/` (config, model, manifest) and `<repo>/README.md`; verify the config.

    The artifact is checked against `manifest` first (`runtime.verify.check_vouches`: status
    passed, its sha256), and its copy in the repository after it was written.

    Raises:
        ValueError: a name Triton cannot use, an artifact format without a Triton platform, or a
            generated config that does not parse back to the manifest's tensors.
        UnverifiedArtifactError: the artifact, or its copy, is not what its manifest vouches for.
    """
    if not NAME.fullmatch(name):
        raise ValueError(f"--name {name!r}: expected {NAME_RULE} (a Triton model name)")
    if manifest.get("format") not in PLATFORMS:
        raise ValueError(f"manifest format {manifest.get('format')!r}: expected onnx or tensorrt")
    if not 1 <= max_batch_size <= manifest["batch"]["max"]:
        raise ValueError(
            f"Triton max_batch_size {max_batch_size} must be in 1..{manifest['batch']['max']} "
            "(the artifact's --batch-max)"
        )
    if manifest["format"] == "tensorrt" and manifest["batch"].get("min", 1) > 1:
        raise ValueError(
            f"plan profile starts at batch {manifest['batch']['min']}: Triton's dynamic batcher "
            "sends batches from 1 up, which the plan would refuse; export with --batch-min 1"
        )
    check_vouches(artifact, manifest)
    repo = Path(repo)
    model_dir = repo / name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    target = version_dir / PLATFORMS[manifest["format"]][1]
    atomic_copy(artifact, target)
    same_file_as_manifest(target, manifest)
    write_manifest(target, dict(manifest))
    text = render_config(name, manifest, max_batch_size=max_batch_size, instances=instances)
    validate_config(parse_pbtxt(text), manifest, name=name, max_batch_size=max_batch_size)
    atomic_write_text(model_dir / "config.pbtxt", text)
    atomic_write_text(repo / "README.md", render_readme(name, manifest, repo=repo))
    return model_dir


__all__ = [
    "PbtxtError",
    "container_tag",
    "parse_pbtxt",
    "read_repository_config",
    "render_config",
    "render_readme",
    "validate_config",
    "write_repository",
]
