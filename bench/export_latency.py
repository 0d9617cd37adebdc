"""Export latency benchmark: teacher and student, PyTorch eager vs ONNX Runtime, one table.

    python bench/export_latency.py                       # random-weight R101 teacher, R50 student
    python bench/export_latency.py --student runs/student/best.pt --teacher runs/teacher/best.pt \
        --imgsz 512x512 --batch 1,4

Each checkpoint is exported to fp32 ONNX (legacy exporter, opset 17, onnxslim) and timed next to
its PyTorch eager source with the same protocol (`pgd_deploy.export.bench`). The issue's CPU
target: ONNX Runtime student <= 0.8x the PyTorch eager student latency at the same size.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

TARGET_RATIO = 0.8


def _random_checkpoint(path: Path, depth: int) -> Path:
    from pgd_deploy.checkpoint import save_checkpoint
    from pgd_deploy.config import ModelConfig, TrainJob, to_dict
    from pgd_deploy.models import build_detector

    if path.is_file():
        return path
    model = build_detector(ModelConfig(depth=depth, num_classes=80), num_classes=80)
    cfg = TrainJob(model=ModelConfig(depth=depth, num_classes=80))
    names = [f"class{i}" for i in range(80)]
    return save_checkpoint(
        {"model": model.state_dict(), "config": to_dict(cfg), "classes": names}, path
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--student", help="student checkpoint (default: random-weight FCOS R50)")
    p.add_argument("--teacher", help="teacher checkpoint (default: random-weight FCOS R101)")
    p.add_argument("--imgsz", default="320x320", help="HxW")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = default)")
    p.add_argument("--out", default="runs/bench_export", help="where checkpoints/ONNX/results go")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from pgd_deploy.export import bench
    from pgd_deploy.export.command import parse_imgsz
    from pgd_deploy.export.to_onnx import export_checkpoint_onnx
    from pgd_deploy.io_utils import atomic_write_text, write_json

    out = Path(args.out)
    imgsz = parse_imgsz(args.imgsz)
    batches = [int(b) for b in args.batch.split(",")]
    checkpoints = {
        "teacher": Path(args.teacher)
        if args.teacher
        else _random_checkpoint(out / "teacher_r101.pt", 101),
        "student": Path(args.student)
        if args.student
        else _random_checkpoint(out / "student_r50.pt", 50),
    }
    targets = []
    for label, ckpt in checkpoints.items():
        onnx_path = out / f"{label}_{imgsz[0]}x{imgsz[1]}.onnx"
        export_checkpoint_onnx(ckpt, onnx_path, imgsz=imgsz, batch=(1, max(batches), max(batches)))
        targets.append(bench.Target(label, onnx_path))
    rows = bench.run_bench(
        targets,
        batches=batches,
        warmup=args.warmup,
        iters=args.iters,
        min_seconds=args.min_seconds,
        threads=args.threads,
    )
    table = bench.format_table(rows)
    text = f"{bench.environment_line()}, input {imgsz[0]}x{imgsz[1]}\n\n{table}\n"
    print(text)
    atomic_write_text(out / "export_latency.md", text)
    write_json(out / "export_latency.json", bench.rows_to_json(rows))
    student = [r for r in rows if r.model == "student" and r.runtime.startswith("onnxruntime")]
    ok = all(r.ratio is not None and r.ratio <= TARGET_RATIO for r in student)
    ratios = ", ".join(f"batch {r.batch}: {r.ratio:.2f}x" for r in student)
    print(
        f"target ONNX Runtime student <= {TARGET_RATIO}x PyTorch eager: {ratios} "
        f"-> {'met' if ok else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
