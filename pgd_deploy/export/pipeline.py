"""The end-to-end export behind `pgd-export`: checkpoint -> artifact(s) -> gates -> manifest.

Steps: check all that needs no checkpoint (flags, name, output folder, TensorRT for a plan:
`preflight`); load the checkpoint; export the dense fp32 ONNX (legacy exporter,
opset 17, onnxslim); convert its precision (fp16 / int8 Q/DQ for the int8 target, CPU; a
quantization-aware checkpoint exports its learned scales, `qat_export.py`); append in-graph NMS when
asked; write the ONNX with its manifest; run the three gates with ONNX Runtime against PyTorch;
for `--format tensorrt` build the strongly typed plan from that ONNX and gate it too
(`plan.py`); for `--format triton` write the model repository. A failing gate keeps the
artifact, marks its manifest "failed" and sets the exit code of the first failing gate
(`gates.EXIT_CODES`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pgd_deploy.config import ExportConfig, ExportJob, save_config, to_dict
from pgd_deploy.export import qat_export
from pgd_deploy.export.deploy_model import check_imgsz
from pgd_deploy.export.gates import GateReport, run_gates
from pgd_deploy.export.manifest import dense_twin_manifest, describe_io, record_gates
from pgd_deploy.export.plan import DENSE_TWIN
from pgd_deploy.export.preflight import Checked, preflight, resolve_int8_target, wants_plan
from pgd_deploy.io_utils import atomic_write_text, remove_stale_temp_files, scratch_folder
from pgd_deploy.progress import timed_step
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

    def add(self, artifact: Path, manifest: dict[str, Any], report: GateReport) -> None:
        """Record a gated artifact with its manifest and gate report."""
        self.artifacts.append(artifact)
        self.manifests[str(artifact)] = manifest
        self.reports.append(report)


@dataclass
class ExportContext:
    """Everything the steps of one export share (built once by `_prepare`)."""

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
    level_sizes: list[int]
    tmp: Path  # scratch folder of this export (the dense twin of an NMS artifact lives here)
    postprocess: dict[str, Any]  # the artifact's post-processing (`export_postprocess`)
    int8_target: str | None = None  # "cpu" / "tensorrt" for int8, else None
    fp32_reference: Any = None  # QAT checkpoint: the fp32 student's backend (agreement, mAP)

    def gate(self, candidate: Any, dense_candidate: Any | None, artifact: str) -> GateReport:
        """`gates.run_gates` of an artifact's backend against this export's reference, images
        and tolerances (`dense_candidate`: the dense twin of an in-graph NMS artifact)."""
        return run_gates(
            self.reference,
            candidate,
            self.images,
            precision=self.cfg.precision,
            gates=self.job.gates,
            imgsz=self.imgsz,
            batch_size=self.gate_batch,
            dense_candidate=dense_candidate,
            artifact=artifact,
            fp32_reference=self.fp32_reference,
        )


def export_postprocess(detector_post: dict[str, Any], cfg: ExportConfig) -> dict[str, Any]:
    """The artifact's post-processing: the detector's, except that an in-graph NMS artifact
    applies the export's thresholds (`conf`, `iou`, `max_det`), which its reference must use too.
    The detector itself is never changed."""
    post = dict(detector_post)
    if cfg.nms == "onnx":
        post.update(score_thresh=cfg.conf, nms_thresh=cfg.iou, max_det=cfg.max_det)
    return post


def _prepare(checkpoint: str | Path, job: ExportJob, checked: Checked, tmp: Path) -> ExportContext:
    import torch

    from pgd_deploy.export.images import gate_images
    from pgd_deploy.export.source import load_source
    from pgd_deploy.runtime.torch_backend import TorchBackend

    cfg = job.export
    imgsz, profile, name, out = checked.imgsz, checked.profile, checked.name, checked.out
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):  # fp32 reference: TF32 would blur the fp32 parity gate
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    src = load_source(checkpoint, device)
    if imgsz is None:  # the size the checkpoint was trained and evaluated at
        imgsz = check_imgsz(src.config.data.input_size())
        logger.info("--imgsz %dx%d: the size %s was trained and evaluated at", *imgsz, checkpoint)
        cfg = replace(cfg, imgsz=imgsz)
        job = replace(job, export=cfg)  # what the manifest and .export.toml record
    qat_export.check_qat_export(src, cfg.precision)
    postprocess = export_postprocess(src.postprocess_kwargs, cfg)
    fp32 = None
    if qat_export.is_qat(src):
        fp32 = qat_export.fp32_reference(src, cfg.fp32_reference, device, imgsz, postprocess)
    reference = TorchBackend.from_detector(
        src.detector,
        input_size=imgsz,
        class_names=src.class_names,
        category_ids=src.category_ids,
        postprocess=postprocess,
        metric=src.config.data.metric,  # the mAP gate scores as the training did
    )
    images = gate_images(cfg, src.config.data, cfg.gate_images)
    gate_batch = max(1, min(cfg.batch_opt, cfg.batch_max, len(images)))
    level_sizes = list(reference.level_sizes)
    return ExportContext(
        job,
        cfg,
        src,
        imgsz,
        profile,
        name,
        out,
        images,
        reference,
        gate_batch,
        level_sizes,
        tmp,
        postprocess,
        int8_target=resolve_int8_target(cfg),
        fp32_reference=fp32,
    )


def _convert(ctx: ExportContext, dense: Any) -> tuple[Any, dict[str, Any]]:
    from pgd_deploy.export import precision

    cfg = ctx.cfg
    if cfg.precision == "fp16":
        with timed_step("converting to mixed fp16 (onnxconverter-common)", logger):
            return precision.convert_fp16(dense)
    if cfg.precision == "int8" and ctx.fp32_reference is not None:
        path = ctx.fp32_reference.path
        return qat_export.learned_int8(dense, ctx.src, ctx.int8_target, path)
    if cfg.precision == "int8":
        from pgd_deploy.export.images import calibration_images

        calib = calibration_images(cfg, ctx.src.config.data, cfg.calib_images)
        batches = (b for b, _ in calib.batches(ctx.imgsz, CALIB_BATCH))
        return precision.quantize_int8(
            dense,
            batches,
            method=cfg.calib_method,
            calib_source=calib.source,
            target=ctx.int8_target,
            calib_total=len(calib),
        )
    return dense, {"precision": "fp32", "tool": "torch.onnx.export (no conversion)"}


def _build_onnx(ctx: ExportContext) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """(dense model at the target precision, final model, recipe, nms settings)."""
    from pgd_deploy.export.nms import append_nms, nms_settings
    from pgd_deploy.export.to_onnx import export_onnx, fix_output_dims

    cfg = ctx.cfg
    dense = export_onnx(
        ctx.src.detector,
        imgsz=ctx.imgsz,
        opset=cfg.opset,
        exporter=cfg.exporter,
        simplify=cfg.simplify,
    )
    dense, recipe = _convert(ctx, dense)
    classes = ctx.src.detector.num_classes
    dense = fix_output_dims(dense, num_locations=sum(ctx.level_sizes), num_classes=classes)
    recipe.update(exporter=cfg.exporter, opset=cfg.opset, simplified=cfg.simplify)
    nms = nms_settings(
        cfg.nms,
        max_det=cfg.max_det,
        conf=cfg.conf,
        iou=cfg.iou,
        topk=cfg.nms_topk,
        candidates=sum(ctx.level_sizes) * classes,
    )
    final = dense
    if cfg.nms == "onnx":
        final = append_nms(
            dense,
            imgsz=ctx.imgsz,
            max_det=cfg.max_det,
            conf=cfg.conf,
            iou=cfg.iou,
            topk=cfg.nms_topk,
        )
    return dense, final, recipe, nms


def _gate_onnx(ctx: ExportContext, onnx_path: Path, manifest: dict[str, Any]) -> GateReport:
    from pgd_deploy.runtime.backends import OrtBackend

    candidate = OrtBackend(onnx_path, device="cpu")
    dense_backend, dense_path = None, onnx_path
    if ctx.cfg.nms == "onnx":  # tensor parity needs the outputs before NMS: the dense twin
        dense_path = ctx.tmp / "dense.onnx"
        dense_backend = OrtBackend(dense_path, device="cpu")
    artifact = f"{onnx_path.name} (ONNX Runtime {candidate.provider})"
    report = ctx.gate(candidate, dense_backend, artifact)
    if ctx.fp32_reference is not None:  # QAT: tensor parity layer by layer
        batch = next(iter(ctx.images.batches(ctx.imgsz, ctx.gate_batch)))[0]
        qat_export.gate_layerwise(report, ctx.src.detector, dense_path, batch, ctx.job.gates)
    return report


def _export_onnx_artifact(ctx: ExportContext, result: ExportResult) -> tuple[Path, dict[str, Any]]:
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
        level_sizes=ctx.level_sizes,
        postprocess=ctx.postprocess,
        int8_target=ctx.int8_target,
        gate_images=ctx.images.source,
        export_config=to_dict(ctx.job),
    )
    if ctx.cfg.nms == "onnx":  # the dense twin: gated with the artifact (and built with a plan)
        save_onnx(dense, ctx.tmp / "dense.onnx")
        twin = dense_twin_manifest(manifest, describe_io(dense)[1])
        write_manifest(ctx.tmp / "dense.onnx", twin)
    path = ctx.out / f"{ctx.name}.onnx"
    save_onnx(final, path, manifest)
    write_manifest(path, manifest)  # "unchecked" until the gates below finish
    report = _gate_onnx(ctx, path, manifest)
    extra = {"parity_on": DENSE_TWIN} if ctx.cfg.nms == "onnx" else {}
    record_gates(path, manifest, report, "onnxruntime CPUExecutionProvider", extra)
    result.add(path, manifest, report)
    return path, manifest


def run_export(checkpoint: str | Path, job: ExportJob) -> ExportResult:
    """Export `checkpoint` as `job.export` says; see the module docstring.

    Raises:
        CheckpointError / ValueError: bad input (unreadable checkpoint, bad flags or paths).
        ImportError: a missing optional dependency (the message names the extra).
        TensorRTBuildError: the TensorRT parser or builder failed.
    """
    checked = preflight(checkpoint, job.export)
    out = checked.out
    for leftover in [*remove_stale_temp_files(out), *remove_stale_temp_files(out / "triton")]:
        logger.info("removed %s, left by an export that was killed", leftover)
    with scratch_folder(out, "pgd_export") as tmp:
        ctx = _prepare(checkpoint, job, checked, tmp)
        result = ExportResult()
        artifact, manifest = _export_onnx_artifact(ctx, result)
        if wants_plan(ctx.cfg) and result.reports[-1].passed:
            from pgd_deploy.export.plan import export_plan

            artifact, manifest = export_plan(ctx, artifact, manifest, result)
        elif wants_plan(ctx.cfg):
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
    result.exit_code = next((r.exit_code for r in result.reports if r.exit_code), 0)
    result.report_path = atomic_write_text(ctx.out / f"{ctx.name}.gates.md", result.markdown())
    save_config(ctx.job, ctx.out / f"{ctx.name}.export.toml")
    return result
