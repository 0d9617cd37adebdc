"""The TensorRT leg of `pgd-export`: build a plan from the gated ONNX, gate it, write its manifest.

The plan is `<name>_trt.plan` with `<name>_trt.manifest.json` beside it, so it never shares a
manifest with `<name>.onnx`. An in-graph-NMS plan has no dense outputs, so its tensor parity is
measured on a dense twin: a plan built with the same settings from the same model before NMS,
kept only for the gates. Its detection agreement and mAP are measured on its own NMS outputs,
against host NMS with the same pre-NMS top-k (`gates.run_gates`, through
`pipeline.ExportContext.gate`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pgd_deploy.export.deploy_model import INPUT_NAME
from pgd_deploy.export.manifest import plan_manifest, record_gates
from pgd_deploy.runtime.manifest import read_manifest, write_manifest

PLAN_SUFFIX = "_trt.plan"
DENSE_TWIN = "dense twin (the same model before NMS, built and run like the artifact)"


def plan_path(out: Path, name: str) -> Path:
    """Where the plan of export `name` goes (its manifest: `<name>_trt.manifest.json`)."""
    return Path(out) / f"{name}{PLAN_SUFFIX}"


def _build(ctx: Any, onnx_path: Path, plan: Path, nms_candidates: int) -> dict[str, Any]:
    from pgd_deploy.export import to_tensorrt

    cfg = ctx.cfg
    return to_tensorrt.build_engine(
        onnx_path,
        plan,
        input_name=INPUT_NAME,
        imgsz=ctx.imgsz,
        profile=ctx.profile,
        precision=cfg.precision,
        workspace_gb=cfg.workspace_gb,
        opt_level=cfg.builder_opt_level,
        timing_cache=cfg.timing_cache,
        hw_compat=cfg.hw_compat,
        version_compatible=cfg.trt_version_compatible,
        nms_candidates=nms_candidates,
    )


def _dense_twin(ctx: Any) -> Any | None:
    """The dense twin plan's runner for an NMS export (None without in-graph NMS)."""
    if ctx.cfg.nms != "onnx":
        return None
    from pgd_deploy.runtime import trt_backend

    dense_onnx = ctx.tmp / "dense.onnx"
    twin = ctx.tmp / f"dense{PLAN_SUFFIX}"
    info = _build(ctx, dense_onnx, twin, nms_candidates=0)
    write_manifest(twin, plan_manifest(dense_onnx, read_manifest(dense_onnx), info, twin))
    return trt_backend.TrtBackend(twin)


def export_plan(
    ctx: Any, onnx_path: Path, onnx_manifest: dict[str, Any], result: Any
) -> tuple[Path, dict[str, Any]]:
    """Build, gate and record the plan of a passed ONNX export; returns (plan, its manifest).

    Args:
        ctx: the export's `pipeline.ExportContext`.
        onnx_path, onnx_manifest: the gated ONNX the plan is built from.
        result: the `pipeline.ExportResult` the plan, its manifest and gate report are added to.

    Raises:
        ImportError / TensorRTBuildError: from the build (`to_tensorrt.build_engine`).
    """
    from pgd_deploy.runtime import trt_backend

    plan = plan_path(ctx.out, ctx.name)
    nms = onnx_manifest.get("nms", {})
    info = _build(ctx, onnx_path, plan, nms_candidates=int(nms.get("pre_nms_topk", 0)))
    manifest = plan_manifest(onnx_path, onnx_manifest, info, plan)
    write_manifest(plan, manifest)  # "unchecked" until the gates below finish
    dense = _dense_twin(ctx)
    artifact = f"{plan.name} (TensorRT {info['version']}, {info['gpu']})"
    report = ctx.gate(trt_backend.TrtBackend(plan), dense, artifact)
    extra = {"parity_on": DENSE_TWIN} if dense is not None else {}
    record_gates(plan, manifest, report, f"tensorrt {info['version']}", extra)
    result.add(plan, manifest, report)
    return plan, manifest
