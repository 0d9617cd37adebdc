"""The teacher-vs-student speed table: every backend x precision, batch 1 and 8, one run.

    python bench/export_latency.py                 # random-weight quickstart R101 / R50, 256x256
    python bench/export_latency.py --teacher runs/demo/teacher/best.pt \
        --student runs/demo/pgd/best.pt --val runs/demo/... --plot speed.png
    python bench/export_latency.py --compile       # also torch.compile rows (slow to compile)

Each checkpoint is exported with `pgd-export`'s gated pipeline to ONNX fp32, fp16 and int8 for
each target (cpu: uint8 activations for ONNX Runtime on x86; tensorrt: symmetric, what a plan
is built from; on a CPU machine that row runs in ONNX Runtime and says nothing about a GPU), and
TensorRT fp16 / int8 plans when TensorRT and a GPU are present. Then every artifact and every
PyTorch precision of both checkpoints (fp32 eager, bf16 / fp16 autocast where the device runs
them, with --compile also compiled) are timed round-robin in one run (`pgd_deploy.export.bench`,
network only). Ratios: against the same model's PyTorch fp32 eager and against the teacher's.

Without checkpoints, random-weight ones at the quickstart configuration are built (train/
quickstart_{teacher,student}.toml: FCOS R101 / R50, 256-wide FPN and head, 3 classes): latency
does not depend on the weights, and the export gates then only check that the exports run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

TARGET_RATIO = 0.8
RECIPES = Path(__file__).resolve().parents[1] / "train"
ONNX_VARIANTS = {  # --exports name -> (format, precision, int8 target)
    "fp32": ("onnx", "fp32", "auto"),
    "fp16": ("onnx", "fp16", "auto"),
    "int8-cpu": ("onnx", "int8", "cpu"),
    "int8-tensorrt": ("onnx", "int8", "tensorrt"),
    "trt-fp16": ("tensorrt", "fp16", "auto"),
    "trt-int8": ("tensorrt", "int8", "tensorrt"),
}


def _random_checkpoint(path: Path, role: str) -> Path:
    """A random-weight checkpoint of the quickstart recipe `role` (teacher / student)."""
    from pgd_deploy.checkpoint import save_checkpoint
    from pgd_deploy.config import TrainJob, load_config, to_dict
    from pgd_deploy.data.shapes import SHAPE_CLASSES, ShapesSpec
    from pgd_deploy.models import build_detector

    if path.is_file():
        return path
    cfg = load_config(TrainJob, RECIPES / f"quickstart_{role}.toml")
    names = list(SHAPE_CLASSES[: ShapesSpec().num_classes])
    model = build_detector(cfg.model, num_classes=len(names))
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(
        {"model": model.state_dict(), "config": to_dict(cfg), "classes": names}, path
    )


def _tensorrt_usable() -> bool:
    try:
        import tensorrt  # noqa: F401
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _export(ckpt: Path, label: str, variant: str, args: argparse.Namespace) -> Path | None:
    from pgd_deploy.config import ExportConfig, ExportJob
    from pgd_deploy.export.pipeline import run_export

    fmt, precision, target = ONNX_VARIANTS[variant]
    name = f"{label}_{variant}_{args.imgsz[0]}x{args.imgsz[1]}"
    export = ExportConfig(
        format=fmt,
        precision=precision,
        int8_target=target,
        imgsz=tuple(args.imgsz),
        batch_min=1,
        batch_opt=max(args.batches),
        batch_max=max(args.batches),
        gate_images=args.gate_images,
        calib_images=args.calib_images,
        device="auto" if args.device.startswith("tensorrt") else args.device,  # PyTorch's
        out=str(args.out),
        name=name,
    )
    try:
        result = run_export(ckpt, ExportJob(export=export))
    except (ValueError, ImportError, RuntimeError) as err:  # e.g. an extra not installed
        logging.warning("%s: not exported, no row: %s", name, err)
        return None
    if not result.passed:  # kept and timed; the table's reader sees the gate report path
        logging.warning("%s: a gate failed (%s)", name, result.report_path)
    return result.artifacts[-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--student", help="student checkpoint (default: random-weight quickstart R50)")
    p.add_argument("--teacher", help="teacher checkpoint (default: random-weight quickstart R101)")
    p.add_argument("--imgsz", default="256x256", help="HxW (default 256x256)")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument(
        "--exports",
        default="auto",
        help=f"comma list of {', '.join(ONNX_VARIANTS)}; auto = the ONNX ones, and the TensorRT "
        "plans when TensorRT and a GPU are present",
    )
    p.add_argument("--torch-precision", default="auto", help="as pgd-export bench")
    p.add_argument("--compile", action="store_true", help="also torch.compile rows")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--device", default="auto", help="as pgd-export bench --device")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-seconds", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = default)")
    p.add_argument("--gate-images", type=int, default=8, help="images each export is gated on")
    p.add_argument("--calib-images", type=int, default=32, help="int8 calibration images")
    p.add_argument("--val", help="COCO JSON (or dataset root): AP per row and the plot")
    p.add_argument("--val-images", help="image folder of a --val JSON")
    p.add_argument("--val-count", type=int, default=100)
    p.add_argument("--plot", help="speed-accuracy PNG (with --val)")
    p.add_argument("--out", default="runs/bench_export", help="checkpoints, exports, results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from pgd_deploy.export import bench, bench_report
    from pgd_deploy.export.command import _bench_val, parse_imgsz
    from pgd_deploy.io_utils import atomic_write_text, write_json

    args.out = Path(args.out)
    args.imgsz = parse_imgsz(args.imgsz)
    args.batches = [int(b) for b in args.batch.split(",")]
    variants = (
        [v for v in ONNX_VARIANTS if not v.startswith("trt-") or _tensorrt_usable()]
        if args.exports == "auto"
        else [v.strip() for v in args.exports.split(",") if v.strip()]
    )
    unknown = sorted(set(variants) - set(ONNX_VARIANTS))
    if unknown:
        p.error(f"--exports: unknown {unknown}; known: {', '.join(ONNX_VARIANTS)}")
    checkpoints = {
        "teacher": Path(
            args.teacher or _random_checkpoint(args.out / "teacher_r101.pt", "teacher")
        ),
        "student": Path(args.student or _random_checkpoint(args.out / "student_r50.pt", "student")),
    }
    targets = []
    for label, ckpt in checkpoints.items():
        exported = [_export(ckpt, label, v, args) for v in variants]
        targets += [bench.Target(label, path) for path in exported if path is not None]
        if not any(exported):  # no export at all: PyTorch rows of the checkpoint itself
            targets.append(bench.Target(label, ckpt))
    rows = bench.run_bench(
        targets,
        batches=args.batches,
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
    )
    command = "python bench/export_latency.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    text = (
        f"{bench_report.environment_line()}, input {args.imgsz[0]}x{args.imgsz[1]}, network only\n"
        f"command: {command.strip()}\n\n{bench_report.format_table(rows)}\n"
    )
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "export_latency.md", text)
    write_json(args.out / "export_latency.json", bench_report.rows_to_json(rows))
    if args.plot:
        print(f"wrote {bench_report.plot_speed_accuracy(rows, args.plot)}")
    student = [
        r
        for r in rows
        if r.model == "student" and r.runtime.startswith("onnxruntime") and r.precision == "fp32"
    ]
    if student:
        ok = all(r.ratio is not None and r.ratio <= TARGET_RATIO for r in student)
        ratios = ", ".join(f"batch {r.batch}: {r.ratio:.2f}x" for r in student)
        print(
            f"ONNX Runtime fp32 student <= {TARGET_RATIO}x its PyTorch fp32 eager: {ratios} "
            f"-> {'met' if ok else 'NOT met'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
