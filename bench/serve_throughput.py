"""Throughput of `pgd-serve predict` against the model alone, over the coco128 val images.

In one run, interleaved chunk by chunk (A-B-B-A, so that a change of load on a shared machine
hits both alike):
  * model-only: images decoded and letterboxed in memory beforehand (untimed), batches fed
    straight to `backend.infer` (the ceiling: what the network alone sustains);
  * end-to-end: `serve.predictor.run_predict` over the image files (decode, letterbox, infer,
    post-process, COCO JSON writing; set-up included), the code path of `pgd-serve predict`.
Each round covers every image in both modes; it prints images/s per round, the medians, and the
ratio end-to-end / model-only (median of the per-round ratios). The target with ONNX Runtime on
CPU is >= 0.85.

    python bench/serve_throughput.py                       # random R18, exported at 640x640
    python bench/serve_throughput.py --model exports/pgd.onnx
    python bench/serve_throughput.py --checkpoint runs/demo/pgd/best.pt --imgsz 640

Without --model the checkpoint (default: a random-weight FCOS R18) is exported to ONNX with
`pgd_deploy.export.to_onnx.export_checkpoint_onnx` into a temporary folder (needs torch).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pgd_deploy.runtime.backends import load_backend
from pgd_deploy.runtime.preprocess import load_image
from pgd_deploy.serve.predictor import run_predict
from pgd_deploy.serve.sources import Source, resolve_source

# coco128 as the tests find it: $PGD_COCO128, else shared/data/coco128 beside the repository.
COCO128 = Path(
    os.environ.get("PGD_COCO128")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"
)
COCO128_VAL = COCO128 / "images" / "val2017"


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="ONNX model with its manifest (skips the export)")
    p.add_argument("--checkpoint", help="checkpoint to export (default: random FCOS R18)")
    p.add_argument("--imgsz", type=int, default=640, help="export input side (default: 640)")
    p.add_argument(
        "--images",
        default=str(COCO128_VAL),
        help="image folder (default: coco128 val from $PGD_COCO128 or beside the repository)",
    )
    p.add_argument("--batch", type=int, default=8, help="images per inference call")
    p.add_argument("--workers", type=int, default=2, help="decode threads of predict")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of each mode")
    p.add_argument("--limit", type=int, default=0, help="use the first N images (0 = all)")
    p.add_argument("--chunk", type=int, default=32, help="images per interleaved chunk")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    return p.parse_args()


def _random_checkpoint(path: Path) -> Path:
    import torch

    from pgd_deploy.checkpoint import save_checkpoint
    from pgd_deploy.config import DataConfig, ModelConfig, TrainJob, to_dict
    from pgd_deploy.models import build_detector

    torch.manual_seed(0)
    cfg = ModelConfig(depth=18, num_classes=80)
    model = build_detector(cfg)
    job = TrainJob(model=cfg, data=DataConfig(min_size=640, max_size=640))
    save_checkpoint({"model": model.state_dict(), "config": to_dict(job)}, path)
    return path


def _onnx_model(args: argparse.Namespace, tmp: Path) -> Path:
    if args.model:
        return Path(args.model)
    from pgd_deploy.export.to_onnx import export_checkpoint_onnx

    ckpt = Path(args.checkpoint) if args.checkpoint else _random_checkpoint(tmp / "r18.pt")
    print(f"exporting {ckpt} to ONNX at {args.imgsz}x{args.imgsz} ...", flush=True)
    return export_checkpoint_onnx(
        ckpt, tmp / "model.onnx", imgsz=(args.imgsz, args.imgsz), batch=(1, args.batch, 64)
    )


def model_only_seconds(backend, images: list[np.ndarray], batch: int) -> float:
    """Seconds of `backend.infer` alone over `images`, letterboxed beforehand (untimed)."""
    letterboxed = backend.preprocess(images)[0]  # [N, 3, H, W]
    batches = [letterboxed[i : i + batch] for i in range(0, len(images), batch)]
    start = time.perf_counter()
    for chunk in batches:
        backend.infer(chunk)
    backend.sync()
    return time.perf_counter() - start


def end_to_end_seconds(backend, source: Source, out: Path, batch: int, workers: int) -> float:
    """Seconds of the whole `pgd-serve predict` path over `source` (set-up and writing included)."""
    start = time.perf_counter()
    summary = run_predict(backend, source, out, batch_size=batch, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    if summary.failed:
        raise RuntimeError(f"{summary.failed} images failed to load; see {out}")
    return seconds


def one_round(backend, source: Source, decoded: list[np.ndarray], args, out: Path):
    """(model-only, end-to-end) images/s over every image, the two modes interleaved chunk by
    chunk in A-B-B-A order, so that a change of machine load hits both alike."""
    totals = [0.0, 0.0]
    for k, start in enumerate(range(0, len(decoded), args.chunk)):
        part = slice(start, start + args.chunk)
        chunk = Source(source.spec, source.kind, source.items[part])
        runs = [
            functools.partial(model_only_seconds, backend, decoded[part], args.batch),
            functools.partial(end_to_end_seconds, backend, chunk, out, args.batch, args.workers),
        ]
        for mode in (0, 1) if k % 2 == 0 else (1, 0):
            totals[mode] += runs[mode]()
    return len(decoded) / totals[0], len(decoded) / totals[1]


def main() -> int:
    args = _parse()
    if not Path(args.images).exists():
        print(
            f"error: no images at {args.images}: pass --images, or set PGD_COCO128 to the coco128 "
            "folder (default: shared/data/coco128 beside the repository)",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="pgd-serve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        backend = load_backend(_onnx_model(args, tmp))
        source = resolve_source(args.images)
        if args.limit:
            source.items = source.items[: args.limit]
        decoded = [load_image(it.path) for it in source.items]
        print(f"{backend.describe()}, {len(decoded)} images, batch {args.batch}", flush=True)
        backend.predict(decoded[: args.batch])  # warm-up
        ceiling, e2e = [], []
        for r in range(args.rounds):
            model_rate, e2e_rate = one_round(backend, source, decoded, args, tmp / "out")
            ceiling.append(model_rate)
            e2e.append(e2e_rate)
            print(
                f"round {r + 1}: model-only {model_rate:.2f} img/s, end-to-end "
                f"{e2e_rate:.2f} img/s, ratio {e2e_rate / model_rate:.3f}",
                flush=True,
            )
    result = {
        "backend": backend.describe(),
        "images": len(decoded),
        "batch": args.batch,
        "workers": args.workers,
        "model_only_img_s": statistics.median(ceiling),
        "end_to_end_img_s": statistics.median(e2e),
        "ratio": statistics.median(e / c for e, c in zip(e2e, ceiling)),
    }
    print(
        f"model-only {result['model_only_img_s']:.2f} img/s | end-to-end "
        f"{result['end_to_end_img_s']:.2f} img/s | ratio {result['ratio']:.3f} (target >= 0.85)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
