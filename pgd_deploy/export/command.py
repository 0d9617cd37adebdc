"""`pgd-export`: export a checkpoint (with gates) or benchmark artifacts.

    pgd-export --checkpoint CKPT --format onnx|tensorrt|triton [--precision ...] [--profile TOML]
    pgd-export bench --artifact [LABEL=]PATH [--artifact ...] [--batch 1,8] [--val DATA]

Exit codes: 0 all gates passed; 2 bad input (message on stderr as `error: ...`); 3 parity gate,
4 agreement gate, 5 mAP gate failed (the artifact is kept, its manifest says "failed"); 1 an
engine build failure.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from pgd_deploy.cli_support import add_verbose, choices, run_command, setup_logging
from pgd_deploy.config import ExportConfig, ServeConfig, add_override_argument
from pgd_deploy.config.bounds import NON_NEGATIVE, POSITIVE, at_least, flag, flag_of
from pgd_deploy.config.loading import toml_literal

EXPORT_FLAGS = {  # CLI flag (argparse dest) -> ExportConfig key
    "format": "format",
    "precision": "precision",
    "int8_target": "int8_target",
    "imgsz": "imgsz",
    "batch_min": "batch_min",
    "batch_opt": "batch_opt",
    "batch_max": "batch_max",
    "nms": "nms",
    "nms_topk": "nms_topk",
    "max_det": "max_det",
    "conf": "conf",
    "iou": "iou",
    "val": "val",
    "val_images": "val_images",
    "own_val_labels": "own_val_labels",
    "gate_images": "gate_images",
    "calib_images": "calib_images",
    "calib_method": "calib_method",
    "calib_data": "calib_data",
    "opset": "opset",
    "exporter": "exporter",
    "simplify": "simplify",
    "workspace": "workspace_gb",
    "builder_opt_level": "builder_opt_level",
    "timing_cache": "timing_cache",
    "hw_compat": "hw_compat",
    "version_compatible": "trt_version_compatible",
    "device": "device",
    "out": "out",
    "name": "name",
}


def parse_imgsz(text: str) -> list[int]:
    """'800x1344' -> [800, 1344]; '640' -> [640, 640].

    Raises:
        argparse.ArgumentTypeError: naming --imgsz and the expected form.
    """
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"--imgsz: expected HxW such as 800x1344, got {text!r}")
    return values


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pgd-export",
        description="Export a checkpoint to ONNX / TensorRT / a Triton repository, with accuracy "
        "gates and a manifest. `pgd-export bench --help` for the latency benchmark.",
        epilog="Exit codes: 0 passed, 2 bad input, 3 parity, 4 agreement, 5 mAP gate failed.",
    )
    p.add_argument("--checkpoint", required=True, help="pgd-deploy checkpoint (.pt)")
    p.add_argument("--profile", help="export profile TOML, e.g. export/tensorrt_fp16.toml")
    p.add_argument("--format", choices=choices(ExportConfig, "format"))
    p.add_argument("--precision", choices=choices(ExportConfig, "precision"))
    p.add_argument(
        "--int8-target",
        choices=choices(ExportConfig, "int8_target"),
        help="int8 Q/DQ rules: cpu = uint8 activations (ONNX Runtime on x86), tensorrt = "
        "symmetric int8 (plans, Triton plans); auto (default) = tensorrt when a plan is built",
    )
    p.add_argument(
        "--imgsz",
        type=parse_imgsz,
        help="fixed input HxW, multiples of 32 (default: the size the checkpoint was trained and "
        "evaluated at, from the data config it records: e.g. 800x1344 for COCO, 128x128 for "
        "the demo models)",
    )
    for name in ("batch-min", "batch-opt", "batch-max"):
        key = name.replace("-", "_")
        p.add_argument(
            f"--{name}", type=flag_of(ExportConfig, key), help="optimisation profile batch"
        )
    p.add_argument(
        "--nms", choices=choices(ExportConfig, "nms"), help="onnx: in-graph NonMaxSuppression"
    )
    p.add_argument(
        "--max-det", type=flag_of(ExportConfig, "max_det"), help="detections per image, --nms onnx"
    )
    p.add_argument(
        "--conf", type=flag_of(ExportConfig, "conf"), help="score threshold of --nms onnx"
    )
    p.add_argument("--iou", type=flag_of(ExportConfig, "iou"), help="IoU threshold of --nms onnx")
    p.add_argument(
        "--nms-topk",
        type=flag_of(ExportConfig, "nms_topk"),
        help="--nms onnx: (location, class) candidates per image before NMS (TensorRT: < 3840; "
        "<= 2000 for SM 5.3/6.2 GPUs)",
    )
    p.add_argument("--val", help="gate images: COCO JSON / dataset root (adds mAP) or a folder")
    p.add_argument("--val-images", help="image folder of a --val JSON")
    p.add_argument(
        "--own-val-labels",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="without --val: gate on the checkpoint's own annotated validation split when its "
        "labels are here, which adds the mAP gate (default on)",
    )
    p.add_argument(
        "--gate-images", type=flag_of(ExportConfig, "gate_images"), help="images used by the gates"
    )
    p.add_argument(
        "--calib-images", type=flag_of(ExportConfig, "calib_images"), help="int8 calibration images"
    )
    p.add_argument("--calib-method", choices=choices(ExportConfig, "calib_method"))
    p.add_argument("--calib-data", help="int8 calibration image folder")
    p.add_argument("--opset", type=flag_of(ExportConfig, "opset"), help="ONNX opset (default 17)")
    p.add_argument("--exporter", choices=choices(ExportConfig, "exporter"))
    p.add_argument("--simplify", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--workspace",
        type=flag_of(ExportConfig, "workspace_gb"),
        help="TensorRT workspace, GB",
    )
    p.add_argument(
        "--builder-opt-level",
        type=flag_of(ExportConfig, "builder_opt_level"),
        help="TensorRT builder level 0-5",
    )
    p.add_argument("--timing-cache", help="TensorRT timing cache file")
    p.add_argument("--hw-compat", choices=choices(ExportConfig, "hw_compat"))
    p.add_argument(
        "--version-compatible",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="TensorRT version-compatible plan: loads on later TensorRT too (a trusted lean "
        "runtime rides in the plan)",
    )
    p.add_argument("--device", help="PyTorch reference device: auto, cpu, cuda")
    p.add_argument("--out", help="output folder")
    p.add_argument("--name", help="artifact base name")
    add_override_argument(p, "override any profile key, e.g. --set gates.fp32_box_atol=1e-3")
    add_verbose(p)
    return p


def _bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pgd-export bench",
        description="Latency of artifacts and of their source checkpoints in PyTorch at every "
        "precision, teacher and student side by side (label them teacher= and student=).",
    )
    p.add_argument(
        "--artifact",
        action="append",
        required=True,
        metavar="[LABEL=]PATH",
        help=".onnx/.plan/.pt, repeatable (e.g. teacher=t.onnx student=s.onnx)",
    )
    p.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,8")
    p.add_argument("--imgsz", type=parse_imgsz, help="input size for checkpoints (.pt)")
    p.add_argument("--warmup", type=flag(NON_NEGATIVE), default=10)
    p.add_argument("--iters", type=flag(POSITIVE), default=50)
    p.add_argument("--min-seconds", type=flag(at_least(0.0), float), default=2.0)
    p.add_argument(
        "--threads", type=flag(NON_NEGATIVE), default=0, help="ONNX Runtime threads (0 = default)"
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda[:N] or tensorrt[:N] (ONNX Runtime's TensorRT provider); the table "
        "names the provider that ran",
    )
    p.add_argument(
        "--torch-precision",
        default="auto",
        help="PyTorch precisions of each checkpoint, e.g. fp32,bf16 (auto: all this device runs: "
        "CUDA fp32, fp16, bf16; CPU fp32, and bf16 with bf16 kernels)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time each PyTorch precision under torch.compile (its first call compiles: "
        "minutes on a small CPU; the table reports it)",
    )
    p.add_argument(
        "--compile-mode", default="default", choices=choices(ServeConfig, "compile_mode")
    )
    p.add_argument("--val", help="COCO JSON (or dataset root) for AP and the plot")
    p.add_argument("--val-images", help="image folder of a --val JSON")
    p.add_argument("--val-count", type=flag(POSITIVE), default=500, help="validation images for AP")
    p.add_argument("--plot", help="speed-accuracy PNG (needs --val)")
    p.add_argument("--json", help="also write the rows as JSON")
    return p


def _overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for dest, key in EXPORT_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            out.append(f"export.{key}={toml_literal(value)}")
    return [*out, *args.overrides]


def _run_export(args: argparse.Namespace) -> int:
    from pgd_deploy.config import ExportJob, load_config
    from pgd_deploy.export.pipeline import run_export

    flags = {  # the flags given, named in the message of a bad value they set
        f"export.{key}": "--" + dest.replace("_", "-")
        for dest, key in EXPORT_FLAGS.items()
        if getattr(args, dest, None) is not None
    }
    job = load_config(ExportJob, args.profile, _overrides(args), flags=flags)
    result = run_export(args.checkpoint, job)
    print(result.markdown())
    for path in result.artifacts:
        print(f"wrote {path} ({result.manifests[str(path)]['status']})")
    if result.repository is not None:
        print(f"wrote Triton repository {result.repository}")
    print(f"gate report: {result.report_path}")
    return result.exit_code


def _run_bench(args: argparse.Namespace) -> int:
    from pgd_deploy.export import bench, bench_report

    batches = [int(b) for b in str(args.batch).split(",") if b.strip()]
    warnings: list[str] = []
    rows = bench.run_bench(
        bench.parse_targets(args.artifact),
        batches=batches,
        imgsz=args.imgsz,
        warmup=args.warmup,
        iters=args.iters,
        min_seconds=args.min_seconds,
        threads=args.threads,
        val_images=_bench_val(args),
        device=args.device,
        precisions=bench.torch_precisions(args.torch_precision, args.device),
        compile=args.compile,
        compile_mode=args.compile_mode,
        warnings=warnings,
    )
    print(f"{bench_report.environment_line()}\n\n{bench_report.format_table(rows)}")
    print(bench_report.LATENCY_NOTE)
    for warning in warnings:
        print(f"WARNING: {warning}")
    if args.json:
        from pgd_deploy.io_utils import write_json

        write_json(args.json, bench_report.rows_to_json(rows))
    if args.plot:
        print(f"wrote {bench_report.plot_speed_accuracy(rows, args.plot)}")
    return 0


def _bench_val(args: argparse.Namespace) -> Any:
    if not args.val:
        return None
    from pgd_deploy.config import DataConfig, ExportConfig
    from pgd_deploy.export.images import gate_images

    cfg = ExportConfig(val=args.val, val_images=args.val_images or "")
    images = gate_images(cfg, DataConfig(), args.val_count)
    if images.annotations is None:
        raise ValueError(f"--val {args.val}: AP needs annotations (a COCO JSON or dataset root)")
    return images


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `pgd-export` (see the module docstring for exit codes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_mode = bool(argv) and argv[0] == "bench"
    parser = _bench_parser() if bench_mode else _export_parser()
    args = parser.parse_args(argv[1:] if bench_mode else argv)
    setup_logging(getattr(args, "verbose", False))
    # RuntimeError: a TensorRT build failure (TensorRTBuildError) exits 1
    return run_command("pgd-export", lambda: _run_bench(args) if bench_mode else _run_export(args))
