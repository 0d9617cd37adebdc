"""What an export checks before any work (`preflight`), before its checkpoint is even loaded:
the flags, the name, the output folder and the libraries its format needs. A bad value is found
in a second, not after the export and its gates ran, and nothing is written.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgd_deploy.config import ExportConfig
from pgd_deploy.export import to_tensorrt
from pgd_deploy.export.deploy_model import check_imgsz
from pgd_deploy.export.nms import validate_nms
from pgd_deploy.export.to_tensorrt import check_build_options, validate_profile
from pgd_deploy.export.triton import NAME, NAME_RULE
from pgd_deploy.io_utils import file_sha256
from pgd_deploy.runtime.manifest import read_manifest


@dataclass(frozen=True)
class Checked:
    """What `preflight` established: the input size (None: the checkpoint's, known once it is
    loaded), the batch profile, the export's name and its (created, writable) output folder."""

    imgsz: tuple[int, int] | None
    profile: Any
    name: str
    out: Path


def validate_export_config(cfg: ExportConfig) -> tuple[tuple[int, int] | None, Any]:
    """Check the flags that do not need a checkpoint; returns ((H, W) or None when --imgsz was
    not given, batch profile).

    Raises:
        ValueError: the message names the flag and the expected value.
    """
    imgsz = check_imgsz(tuple(cfg.imgsz)) if cfg.imgsz else None  # None: the checkpoint's
    profile = validate_profile(cfg.batch_min, cfg.batch_opt, cfg.batch_max)
    if not 7 <= cfg.opset <= 20:
        raise ValueError(f"--opset: expected 17 (7..20 accepted), got {cfg.opset}")
    if cfg.gate_images < 1:
        raise ValueError(
            f"--gate-images: every export runs the gates, expected >= 1, got {cfg.gate_images}"
        )
    if cfg.precision == "int8" and cfg.calib_images < 1:
        raise ValueError(f"--calib-images: expected >= 1 for int8, got {cfg.calib_images}")
    resolve_int8_target(cfg)
    if cfg.nms == "onnx":
        validate_nms(cfg.max_det, cfg.conf, cfg.iou, cfg.nms_topk)
    if wants_plan(cfg):
        check_build_options(
            hw_compat=cfg.hw_compat, opt_level=cfg.builder_opt_level, workspace_gb=cfg.workspace_gb
        )
    if cfg.format == "triton" and cfg.triton_source == "tensorrt" and cfg.batch_min > 1:
        raise ValueError(
            f"--batch-min {cfg.batch_min} with --format triton and triton_source tensorrt: "
            "Triton's dynamic batcher sends batches from 1 up to max_batch_size, and a plan "
            "refuses any batch below its profile minimum; use --batch-min 1"
        )
    if cfg.triton_instances < 1:
        raise ValueError(f"export.triton_instances: expected >= 1, got {cfg.triton_instances}")
    return imgsz, profile


def resolve_int8_target(cfg: ExportConfig) -> str | None:
    """The int8 target of this export ("cpu" or "tensorrt"), None unless int8.

    Raises:
        ValueError: `--int8-target cpu` for an export that builds a TensorRT plan.
    """
    if cfg.precision != "int8":
        return None
    if not wants_plan(cfg):
        return "cpu" if cfg.int8_target == "auto" else cfg.int8_target
    if cfg.int8_target == "cpu":
        what = "--format tensorrt" if cfg.format == "tensorrt" else "a Triton plan"
        raise ValueError(
            f"--int8-target cpu with {what}: TensorRT's explicit quantization needs symmetric int8 "
            "activations (zero point 0), the cpu target has uint8 ones; use --int8-target "
            "tensorrt (the default for plans)"
        )
    return "tensorrt"


def wants_plan(cfg: ExportConfig) -> bool:
    """Whether this export builds a TensorRT plan."""
    return cfg.format == "tensorrt" or (cfg.format == "triton" and cfg.triton_source == "tensorrt")


def default_name(checkpoint: str | Path, cfg: ExportConfig) -> str:
    """`--name`, else `<checkpoint>_<precision>[_<int8 target>][_nms]` with characters outside
    `NAME` replaced by '_'. `<checkpoint>` is the file stem, except that a run's `best.pt` and
    `last.pt` are named after their run folder (`runs/teacher/best.pt` -> `teacher_fp16`,
    `runs/student/last.pt` -> `student_last_fp16`: the teacher's and the student's exports used
    to collide as `best_fp16`). An int8 ONNX names its target (`_cpu` / `_tensorrt`: the two
    are different models); a plan's int8 target is always tensorrt.

    Raises:
        ValueError: a `--name` outside `NAME` (it is refused, not rewritten), or a checkpoint
            stem that gives no usable name.
    """
    if cfg.name:
        if not NAME.fullmatch(cfg.name):
            raise ValueError(
                f"--name {cfg.name!r}: expected {NAME_RULE} (the artifact's file stem and "
                "Triton's model name)"
            )
        return cfg.name
    path = Path(checkpoint)
    stem = path.stem
    if stem in ("best", "last") and path.parent.name not in ("", ".", ".."):
        stem = path.parent.name + ("_last" if stem == "last" else "")
    target = resolve_int8_target(cfg)
    suffix = f"_{target}" if target and not wants_plan(cfg) else ""
    name = f"{stem}_{cfg.precision}{suffix}" + ("_nms" if cfg.nms == "onnx" else "")
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    if not NAME.fullmatch(name):
        raise ValueError(
            f"{checkpoint}: its file name gives the export name {name!r}; name it with --name "
            f"({NAME_RULE})"
        )
    return name


def check_output_folder(out: str | Path) -> Path:
    """Create `out` and prove it writable (a temporary file written and removed).

    Raises:
        ValueError: `--out` cannot be created or written; the message names it and the cause.
    """
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".pgd_write_check_"):
            pass
    except OSError as err:
        raise ValueError(f"--out {out}: not a writable folder ({err.strerror or err})") from None
    return path


def preflight(checkpoint: str | Path, cfg: ExportConfig) -> Checked:
    """Everything about an export that can be checked before its checkpoint is loaded: the
    flags (`validate_export_config`), the name, the output folder, and the libraries its format
    needs (TensorRT and a device buffer library for a plan).

    Raises:
        ValueError: a bad flag, name or output folder. ImportError: a missing library (the
            message names the extra to install).
    """
    imgsz, profile = validate_export_config(cfg)
    name = default_name(checkpoint, cfg)
    if wants_plan(cfg):
        to_tensorrt.check_plan_libraries()
    out = check_output_folder(cfg.out)
    if not cfg.name:
        check_default_name_is_free(out, name, checkpoint)
    return Checked(imgsz, profile, name, out)


def check_default_name_is_free(out: Path, name: str, checkpoint: str | Path) -> None:
    """Refuse a default name whose export in `out` came from another checkpoint (it would be
    overwritten): an explicit `--name` is the user's choice, and the same checkpoint (also
    retrained in place) may replace its own export.

    Raises:
        ValueError: naming both checkpoints and `--name`.
    """
    manifest = read_manifest(out / f"{name}.onnx") if (out / f"{name}.onnx").is_file() else None
    source = (manifest or {}).get("source") or {}
    previous = source.get("checkpoint")
    if not previous or Path(previous).resolve() == Path(checkpoint).resolve():
        return
    if source.get("sha256") and source.get("sha256") == file_sha256(checkpoint):
        return
    raise ValueError(
        f"{out / (name + '.onnx')} is the export of another checkpoint ({previous}); this one "
        f"({checkpoint}) would overwrite it under the same default name. Name it with --name"
    )
