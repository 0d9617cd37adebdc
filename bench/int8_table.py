"""The int8 table of issue 11: fp32, post-training int8 (each target) and QAT int8 of one student.

    python bench/int8_table.py --fp32 runs/demo/pgd/best.pt --qat runs/demo/pgd-int8/best.pt

Exports the fp32 student to fp32 ONNX and to post-training int8 ONNX for both targets (calibrated
on its training images), and the QAT checkpoint (fine-tuned from that student) to int8 ONNX for
both targets with its learned scales; every export runs its gates on the validation split of the
student's data (the whole split by default), so AP and detection agreement come from the same
evaluator and images as `make demo`. Then times every ONNX model and the PyTorch eager students
round-robin in one run (`pgd_deploy.export.bench`, batch 1, network only), and prints one
markdown table (written with the raw rows to OUT/int8_table.{md,json}).

Agreement: the fraction of the fp32 PyTorch student's detections (score >= its threshold) that
the artifact reproduces with the same class at IoU >= 0.9 (fp32), 0.5 (int8: the export's
reported `agreement_with_fp32`; its gate compares a QAT export with its fake-quant model
instead); AP is COCO AP in points. Tables in export/README.md dated before 2026-12-06 used IoU
0.9 for every row. The
tensorrt-target rows run in ONNX Runtime on the CPU: their accuracy is the one TensorRT starts
from, their CPU latency says nothing about a GPU.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

ROWS = (  # name, checkpoint key, precision, int8 target
    ("fp32 ONNX", "fp32", "fp32", None),
    ("PTQ int8", "fp32", "int8", "cpu"),
    ("PTQ int8", "fp32", "int8", "tensorrt"),
    ("QAT int8", "qat", "int8", "cpu"),
    ("QAT int8", "qat", "int8", "tensorrt"),
)


def _export(checkpoint: Path, precision: str, target: str | None, args: Any, val: Any) -> Path:
    from pgd_deploy.config import ExportConfig, ExportJob
    from pgd_deploy.export.pipeline import run_export

    name = f"{checkpoint.parent.name}_{precision}" + (f"_{target}" if target else "")
    export = ExportConfig(
        format="onnx",
        precision=precision,
        int8_target=target or "auto",
        imgsz=tuple(args.imgsz),
        batch_opt=8,
        batch_max=8,
        gate_images=args.gate_images,
        calib_images=args.calib_images,
        val=str(val.annotations),
        val_images=str(val.images),
        out=str(args.out),
        name=name,
    )
    result = run_export(checkpoint, ExportJob(export=export))
    logging.info("%s: %s", name, "gates passed" if result.passed else "a gate FAILED")
    return Path(args.out) / f"{name}.onnx"


def _accuracy(manifest: dict[str, Any]) -> dict[str, float]:
    gates = {r["name"]: r for r in manifest["gates"]["results"]}
    ap = gates["map"]["detail"]
    agreement = gates["agreement"]["detail"]
    return {
        "AP": 100 * ap["exported"]["AP"],
        "fp32_AP": 100 * ap["reference"]["AP"],
        # int8 reports its agreement with fp32 beside the gate's (with its source, IoU 0.5);
        # fp32 / fp16 exports are gated against fp32 itself
        "agreement": agreement.get("agreement_with_fp32", agreement["agreement"]),
        "iou": agreement["iou"],
    }


def build_table(paths: list[tuple[str, Path]], bench_rows: list[Any], fp32: Path) -> list[dict]:
    """One dict per table row: the fp32 PyTorch student first, then each artifact."""
    from pgd_deploy.runtime.manifest import read_manifest

    latency = {r.path: r.ms_per_image for r in bench_rows}
    first = read_manifest(paths[0][1])
    rows = [
        {
            "model": "fp32 PyTorch (eager)",
            "target": "-",
            "scales": "-",
            "AP": _accuracy(first)["fp32_AP"],
            "agreement": 1.0,
            "iou": None,
            "ms": latency[str(fp32)],
        }
    ]
    for label, path in paths:
        manifest = read_manifest(path)
        recipe = manifest["recipe"]
        scales = recipe.get("scales", "-").split(" ")[0]
        rows.append(
            {
                "model": f"{label} ONNX Runtime" if "ONNX" not in label else label + " Runtime",
                "target": manifest.get("int8_target") or "-",
                "scales": scales,
                **_accuracy(manifest),
                "ms": latency[str(path)],
                "gates": manifest["status"],
            }
        )
    base = rows[0]["ms"]
    for row in rows:
        row["ratio"] = row["ms"] / base
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [
        "| model | int8 target | scales | AP | agreement with fp32 (IoU) | CPU ms/img "
        "| vs PyTorch |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        iou = "" if r.get("iou") is None else f" ({r['iou']:g})"
        lines.append(
            f"| {r['model']} | {r['target']} | {r['scales']} | {r['AP']:.2f} | "
            f"{100 * r['agreement']:.1f}%{iou} | {r['ms']:.1f} | {r['ratio']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--fp32", required=True, help="the fp32 student (e.g. runs/demo/pgd/best.pt)")
    p.add_argument("--qat", required=True, help="its QAT checkpoint (runs/demo/pgd-int8/best.pt)")
    p.add_argument("--imgsz", help="HxW (default: the student's training size, rounded to 32)")
    p.add_argument("--gate-images", type=int, default=1_000_000, help="default: the whole split")
    p.add_argument("--calib-images", type=int, default=128, help="post-training calibration")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--min-seconds", type=float, default=10.0)
    p.add_argument("--out", default="runs/int8_table", help="where the ONNX models and tables go")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from pgd_deploy.checkpoint import checkpoint_config, load_checkpoint
    from pgd_deploy.data.dataset import resolve_split
    from pgd_deploy.export import bench, bench_report
    from pgd_deploy.export.command import parse_imgsz
    from pgd_deploy.io_utils import atomic_write_text, write_json

    fp32, qat = Path(args.fp32), Path(args.qat)
    cfg = checkpoint_config(load_checkpoint(fp32), fp32)
    init = load_checkpoint(qat)["qat"]["init"]
    if Path(init).resolve() != fp32.resolve():
        logging.warning("%s was fine-tuned from %s, not from --fp32 %s", qat, init, fp32)
    size = -(-cfg.data.max_size // 32) * 32
    args.imgsz = parse_imgsz(args.imgsz) if args.imgsz else [size, size]
    val = resolve_split(cfg.data, "val")
    sources = {"fp32": fp32, "qat": qat}
    paths = [
        (label, _export(sources[key], precision, target, args, val))
        for label, key, precision, target in ROWS
    ]
    # Labelled by source checkpoint: each PyTorch eager student is timed once, beside all of its
    # artifacts, in the same round-robin.
    targets = [
        bench.Target("qat student" if "QAT" in label else "fp32 student", path)
        for label, path in paths
    ]
    measured = bench.run_bench(
        targets, batches=[1], iters=args.iters, min_seconds=args.min_seconds, device="cpu"
    )
    rows = build_table(paths, measured, fp32)
    table = format_rows(rows)
    text = (
        f"{bench_report.environment_line()}\n\n{table}\n\n{bench_report.format_table(measured)}\n"
    )
    print(text)
    atomic_write_text(Path(args.out) / "int8_table.md", text)
    write_json(Path(args.out) / "int8_table.json", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
