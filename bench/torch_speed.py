"""Teacher and student through the project's torch backend: eager fp32, fp16, fp16 + channels-last
+ torch.compile, at batch 1 and 8, network only (issue 12, part 3; bench/gpu_check.sh runs it).

    python bench/torch_speed.py                        # random COCO R101 / R50, 800x1344, CUDA
    python bench/torch_speed.py --teacher t.pt --student s.pt --imgsz 800x1344 --batch 1,8

"Network only": `TorchBackend`'s compiled unit (network, autocast, box and score decoding, fp32
out) on an input already on the device, synchronised after each call; no host copies, no
pre/post-processing, like the torchvision reference in the issue (FCOS R50, random weights, H200:
eager fp32 bs8 35.7 ms, eager fp16 bs8 26.5 ms, compiled max-autotune fp16 bs8 13.6 ms). Each
configuration's first call is timed alone ("first call s": the compile time of compiled rows).
Target: the student at fp16 + channels-last + compiled, batch 8, <= 1.9 ms/img.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

TARGET_MS_PER_IMAGE = 1.9
RECIPES = Path(__file__).resolve().parents[1] / "train"
CONFIGS = {  # name -> TorchBackend settings
    "eager fp32": {"precision": "fp32", "channels_last": "off"},
    "eager fp16": {"precision": "fp16", "channels_last": "off"},
    "fp16 channels-last compiled": {"precision": "fp16", "channels_last": "on", "compile": True},
}


def _random_coco_checkpoint(path: Path, recipe: str) -> Path:
    """Random weights at a COCO recipe's architecture (80 classes): speed needs no training."""
    from pgd_deploy.checkpoint import save_checkpoint
    from pgd_deploy.config import TrainJob, load_config, to_dict
    from pgd_deploy.models import build_detector

    if path.is_file():
        return path
    cfg = load_config(TrainJob, RECIPES / recipe, ["model.weights='none'"])  # no download
    model = build_detector(cfg.model, num_classes=80)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f"class{i}" for i in range(80)]
    return save_checkpoint(
        {"model": model.state_dict(), "config": to_dict(cfg), "classes": names}, path
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teacher", help="teacher checkpoint (default: random COCO FCOS R101)")
    p.add_argument("--student", help="student checkpoint (default: random COCO FCOS R50)")
    p.add_argument("--imgsz", default="800x1344")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile-mode", default="max-autotune")
    p.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma list of " + ", ".join(CONFIGS)
    )
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", default="runs/torch_speed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import torch

    from pgd_deploy.export import bench, bench_report
    from pgd_deploy.export.command import parse_imgsz
    from pgd_deploy.io_utils import atomic_write_text, write_json
    from pgd_deploy.runtime.torch_backend import TorchBackend

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("torch_speed: no CUDA GPU here (use --device cpu for a CPU run)", file=sys.stderr)
        return 2
    out = Path(args.out)
    imgsz = parse_imgsz(args.imgsz)
    batches = [int(b) for b in args.batch.split(",")]
    checkpoints = {
        "teacher": Path(args.teacher)
        if args.teacher
        else _random_coco_checkpoint(out / "teacher_r101.pt", "fcos_r101_3x_ms_coco.toml"),
        "student": Path(args.student)
        if args.student
        else _random_coco_checkpoint(out / "student_r50.pt", "fcos_r50_1x_coco.toml"),
    }
    rows: list[bench.BenchRow] = []
    for batch in batches:
        for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
            settings = {**CONFIGS[name], "compile_mode": args.compile_mode}
            for label, ckpt in checkpoints.items():
                backend = TorchBackend(ckpt, device=args.device, input_size=imgsz, **settings)
                x = torch.randn(batch, 3, *imgsz, device=backend.device)
                if backend.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)

                def call(backend=backend, x=x) -> None:
                    with torch.no_grad():
                        backend._run(x)
                    backend.sync()

                t0 = time.perf_counter()
                call()
                first = time.perf_counter() - t0
                (st,) = bench._interleaved(
                    [call], warmup=args.warmup, iters=args.iters, min_seconds=0
                )
                runtime = (
                    backend.name + bench._variant_note(backend) + bench._provider_note(backend)
                )
                rows.append(
                    bench.BenchRow(
                        label,
                        runtime,
                        backend.precision,
                        0.0,
                        batch,
                        st.p50,
                        st.p90,
                        st.p99,
                        1000.0 * batch / st.mean,
                        first_call_s=first,
                        ms=st.ms,
                        spread=st.spread,
                    )
                )
                logging.info(
                    "%s %s bs%d: %.2f ms/img, first call %.1f s",
                    label,
                    name,
                    batch,
                    st.ms / batch,
                    first,
                )
                del backend, x
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
    bench._fill_ratios(rows)
    command = " ".join(["python bench/torch_speed.py", *(sys.argv[1:] if argv is None else argv)])
    text = (
        f"{bench_report.environment_line()}, input {imgsz[0]}x{imgsz[1]}, "
        "network only (device tensors)"
        f"\ncommand: {command}\n\n{bench_report.format_table(rows)}\n"
    )
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "torch_speed.md", text)
    write_json(out / "torch_speed.json", bench_report.rows_to_json(rows))
    best = [r for r in rows if r.model == "student" and r.batch == 8 and "compiled" in r.runtime]
    for r in best:
        verdict = "met" if r.ms_per_image <= TARGET_MS_PER_IMAGE else "NOT met"
        print(
            f"target student fp16 compiled bs8 <= {TARGET_MS_PER_IMAGE} ms/img: "
            f"{r.ms_per_image:.2f} ms/img (compile {r.first_call_s:.0f} s) -> {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
