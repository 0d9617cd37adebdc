"""The end-to-end export behind `pgd-export`: checkpoint -> artifact(s) -> gates -> manifest.

Steps: validate the profile; load the checkpoint; export the dense fp32 ONNX (legacy exporter,
opset 17, onnxslim); convert its precision (fp16 / int8 Q/DQ, CPU); append in-graph NMS when
asked; write the ONNX with its manifest; run the three gates with ONNX Runtime against PyTorch;
for `--format tensorrt` build the strongly typed plan from that ONNX and gate it too; for
`--format triton` write the model repository. A failing gate keeps the artifact, marks its
manifest "failed" and sets the exit code of the first failing gate (`gates.EXIT_CODES`).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgd_deploy.config import ExportConfig, ExportJob, save_config, to_dict
from pgd_deploy.export.deploy_model import INPUT_NAME, check_imgsz
from pgd_deploy.export.gates import GateReport, run_gates
from pgd_deploy.export.manifest import STATUS_FAILED, STATUS_PASSED, STATUS_UNCHECKED
from pgd_deploy.export.to_tensorrt import check_build_options, validate_profile
from pgd_deploy.io_utils import atomic_write_text, file_sha256
from pgd_deploy.runtime.manifest import write_manifest

logger = logging.getLogger(__name__)

CALIB_BATCH = 8


@dataclass
class ExportResult:
    """What an export produced.

    Attributes:
        artifacts: files written (ONNX, plan), each with a manifest beside it.
        manifests: artifact path -> its manifest.
        reports: one gate report per gated artifact.
        report_path: the markdown gate report.
        repository: the Triton model folder (`--format triton`), else None.
        exit_code: 0 when every gate passed, else the first failing gate's code.
    """

    artifacts: list[Path] = field(default_factory=list)
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    reports: list[GateReport] = field(default_factory=list)
    report_path: Path | None = None
    repository: Path | None = None
    exit_code: int = 0

    @property
    def passed(self) -> bool:
        return self.exit_code == 0

    def markdown(self) -> str:
        return "\n".join(r.to_markdown() for r in self.reports)


def validate_export_config(cfg: ExportConfig) -> tuple[tuple[int, int], Any]:
    """Check the flags that do not need a checkpoint; returns ((H, W), batch profile).

    Raises:
        ValueError: the message names the flag and the expected value.
    """
    imgsz = check_imgsz(tuple(cfg.imgsz))
    profile = validate_profile(cfg.batch_min, cfg.batch_opt, cfg.batch_max)
    if not 7 <= cfg.opset <= 20:
        raise ValueError(f"--opset: expected 17 (7..20 accepted), got {cfg.opset}")
    if cfg.gate_images < 1:
        raise ValueError(
            f"--gate-images: every export runs the gates, expected >= 1, got {cfg.gate_images}"
        )
    if cfg.precision == "int8" and cfg.calib_images < 1:
        raise ValueError(f"--calib-images: expected >= 1 for int8, got {cfg.calib_images}")
    if cfg.format == "tensorrt" or (cfg.format == "triton" and cfg.triton_source == "tensorrt"):
        check_build_options(
            hw_compat=cfg.hw_compat, opt_level=cfg.builder_opt_level, workspace_gb=cfg.workspace_gb
        )
    if cfg.triton_instances < 1:
        raise ValueError(f"export.triton_instances: expected >= 1, got {cfg.triton_instances}")
    return imgsz, profile


def default_name(checkpoint: str | Path, cfg: ExportConfig) -> str:
    """`<checkpoint stem>_<precision>[_nms]`, e.g. `best_fp16`."""
    name = cfg.name or f"{Path(checkpoint).stem}_{cfg.precision}" + (
        "_nms" if cfg.nms == "onnx" else ""
    )
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


@dataclass
class _Context:
    job: ExportJob
    cfg: ExportConfig
    src: Any
    imgsz: tuple[int, int]
    profile: Any
    name: str
    out: Path
    images: Any
    reference: Any
    gate_batch: int


def _prepare(checkpoint: str | Path, job: ExportJob) -> _Context:
    import torch

    from pgd_deploy.export.images import gate_images
    from pgd_deploy.export.source import load_source
    from pgd_deploy.runtime.backends import TorchBackend

    cfg = job.export
    imgsz, profile = validate_export_config(cfg)
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):  # fp32 reference: TF32 would blur the fp32 parity gate
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    src = load_source(checkpoint, device)
    if cfg.nms == "onnx":  # the reference post-processing uses the in-graph thresholds
        src.detector.postprocess_kwargs.update(
            score_thresh=cfg.conf, nms_thresh=cfg.iou, max_det=cfg.max_det
        )
    reference = TorchBackend.from_detector(
        src.detector,
        input_size=imgsz,
        class_names=src.class_names,
        category_ids=src.category_ids,
    )
    images = gate_images(cfg, src.config.data, cfg.gate_images)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    gate_batch = max(1, min(cfg.batch_opt, cfg.batch_max, len(images)))
    name = default_name(checkpoint, cfg)
    return _Context(job, cfg, src, imgsz, profile, name, out, images, reference, gate_batch)


def _convert(ctx: _Context, dense: Any) -> tuple[Any, dict[str, Any]]:
    from pgd_deploy.export import precision

    cfg = ctx.cfg
    if cfg.precision == "fp16":
        return precision.convert_fp16(dense)
    if cfg.precision == "int8":
        from pgd_deploy.export.images import calibration_images

        calib = calibration_images(cfg, ctx.src.config.data, cfg.calib_images)
        batches = (b for b, _ in calib.batches(ctx.imgsz, CALIB_BATCH))
        return precision.quantize_int8(
            dense, batches, method=cfg.calib_method, calib_source=calib.source
        )
    return dense, {"precision": "fp32", "tool": "torch.onnx.export (no conversion)"}


def _build_onnx(ctx: _Context) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """(dense model at the target precision, final model, recipe, nms settings)."""
    from pgd_deploy.export.nms import append_nms, nms_settings
    from pgd_deploy.export.to_onnx import export_onnx

    cfg = ctx.cfg
    dense = export_onnx(
        ctx.src.detector,
        imgsz=ctx.imgsz,
        opset=cfg.opset,
        exporter=cfg.exporter,
        simplify=cfg.simplify,
    )
    dense, recipe = _convert(ctx, dense)
    recipe.update(exporter=cfg.exporter, opset=cfg.opset, simplified=cfg.simplify)
    nms = nms_settings(cfg.nms, max_det=cfg.max_det, conf=cfg.conf, iou=cfg.iou)
    final = dense
    if cfg.nms == "onnx":
        final = append_nms(dense, imgsz=ctx.imgsz, max_det=cfg.max_det, conf=cfg.conf, iou=cfg.iou)
    return dense, final, recipe, nms


def _finish_manifest(
    path: Path, manifest: dict[str, Any], report: GateReport, runtime: str
) -> dict[str, Any]:
    manifest["status"] = STATUS_PASSED if report.passed else STATUS_FAILED
    manifest["gates"] = {"runtime": runtime, **report.to_dict()}
    manifest["sha256"] = file_sha256(path)
    write_manifest(path, manifest)
    return manifest


def _gate_onnx(ctx: _Context, onnx_path: Path, manifest: dict[str, Any], dense: Any) -> GateReport:
    from pgd_deploy.export.to_onnx import save_onnx
    from pgd_deploy.runtime.backends import OrtBackend

    candidate = OrtBackend(onnx_path, device="cpu")
    with tempfile.TemporaryDirectory(prefix="pgd_dense_") as tmp:
        dense_backend = None
        if ctx.cfg.nms == "onnx":  # tensor parity needs the outputs before NMS
            dense_path = save_onnx(dense, Path(tmp) / "dense.onnx")
            dense_backend = OrtBackend(dense_path, device="cpu", meta=manifest)
        report = run_gates(
            ctx.reference,
            candidate,
            ctx.images,
            precision=ctx.cfg.precision,
            gates=ctx.job.gates,
            imgsz=ctx.imgsz,
            batch_size=ctx.gate_batch,
            dense_candidate=dense_backend,
            artifact=onnx_path.name + " (ONNX Runtime CPU)",
        )
    return report


def _export_onnx_artifact(ctx: _Context, result: ExportResult) -> tuple[Path, dict[str, Any]]:
    from pgd_deploy.export.to_onnx import onnx_manifest, save_onnx

    dense, final, recipe, nms = _build_onnx(ctx)
    manifest = onnx_manifest(
        ctx.src,
        final,
        imgsz=ctx.imgsz,
        batch=(ctx.profile.min, ctx.profile.opt, ctx.profile.max),
        precision=ctx.cfg.precision,
        nms=nms,
        recipe=recipe,
        level_sizes=ctx.reference.level_sizes,
    )
    if ctx.cfg.nms == "onnx":
        manifest["postprocess"] = dict(ctx.reference.postprocess_kwargs)
    manifest["gate_images"] = ctx.images.source
    manifest["export_config"] = to_dict(ctx.job)
    path = ctx.out / f"{ctx.name}.onnx"
    save_onnx(final, path, manifest)
    write_manifest(path, manifest)  # "unchecked" until the gates below finish
    report = _gate_onnx(ctx, path, manifest, dense)
    runtime = "onnxruntime CPUExecutionProvider"
    _finish_manifest(path, manifest, report, runtime)
    result.artifacts.append(path)
    result.manifests[str(path)] = manifest
    result.reports.append(report)
    return path, manifest


def _export_plan(
    ctx: _Context, onnx_path: Path, onnx_manifest: dict[str, Any], result: ExportResult
) -> tuple[Path, dict[str, Any]]:
    from pgd_deploy.export.to_tensorrt import build_engine
    from pgd_deploy.runtime.trt_backend import TrtBackend

    cfg = ctx.cfg
    plan_path = ctx.out / f"{ctx.name}.plan"
    info = build_engine(
        onnx_path,
        plan_path,
        input_name=INPUT_NAME,
        imgsz=ctx.imgsz,
        profile=ctx.profile,
        precision=cfg.precision,
        workspace_gb=cfg.workspace_gb,
        opt_level=cfg.builder_opt_level,
        timing_cache=cfg.timing_cache,
        hw_compat=cfg.hw_compat,
        version_compatible=cfg.trt_version_compatible,
    )
    manifest = {**onnx_manifest, "format": "tensorrt", "tensorrt": info, "gates": {}}
    manifest.update(status=STATUS_UNCHECKED, sha256=file_sha256(plan_path))
    manifest["onnx"] = {"path": str(onnx_path), "sha256": file_sha256(onnx_path)}
    write_manifest(plan_path, manifest)
    report = run_gates(
        ctx.reference,
        TrtBackend(plan_path),
        ctx.images,
        precision=cfg.precision,
        gates=ctx.job.gates,
        imgsz=ctx.imgsz,
        batch_size=ctx.gate_batch,
        artifact=f"{plan_path.name} (TensorRT {info['version']}, {info['gpu']})",
    )
    _finish_manifest(plan_path, manifest, report, f"tensorrt {info['version']}")
    result.artifacts.append(plan_path)
    result.manifests[str(plan_path)] = manifest
    result.reports.append(report)
    return plan_path, manifest


def run_export(checkpoint: str | Path, job: ExportJob) -> ExportResult:
    """Export `checkpoint` as `job.export` says; see the module docstring.

    Raises:
        CheckpointError / ValueError: bad input (unreadable checkpoint, bad flags or paths).
        ImportError: a missing optional dependency (the message names the extra).
        TensorRTBuildError: the TensorRT parser or builder failed.
    """
    ctx = _prepare(checkpoint, job)
    result = ExportResult()
    onnx_path, manifest = _export_onnx_artifact(ctx, result)
    wants_plan = ctx.cfg.format == "tensorrt" or (
        ctx.cfg.format == "triton" and ctx.cfg.triton_source == "tensorrt"
    )
    artifact = onnx_path
    if wants_plan and result.reports[-1].passed:
        artifact, manifest = _export_plan(ctx, onnx_path, manifest, result)
    elif wants_plan:
        logger.error("the ONNX gates failed: the TensorRT engine is not built (fix them first)")
    if ctx.cfg.format == "triton" and result.reports[-1].passed:
        from pgd_deploy.export.triton import write_repository

        result.repository = write_repository(
            ctx.out / "triton",
            ctx.name,
            artifact,
            manifest,
            max_batch_size=ctx.profile.max,
            instances=ctx.cfg.triton_instances,
        )
    for report in result.reports:
        if report.exit_code:
            result.exit_code = report.exit_code
            break
    result.report_path = atomic_write_text(ctx.out / f"{ctx.name}.gates.md", result.markdown())
    save_config(ctx.job, ctx.out / f"{ctx.name}.export.toml")
    return result
