"""PGD training throughput on a CUDA GPU: FCOS R101 teacher -> R50 student, bf16 autocast.

Runs a few iterations of (a) the plain step (teacher forward without grad + student step without
KD) and (b) the full PGD step at 800x1333 (padded to 800x1344), batch 8, random weights, and
prints images/s and the peak memory (`torch.cuda.max_memory_allocated`) of each. Exits 0 with a
message where CUDA is not available.

    python bench/pgd_gpu.py [--iters 10] [--warmup 3] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from pgd_overhead import NUM_CLASSES, random_targets  # bench/ is on sys.path as a script

from pgd_deploy.config import ModelConfig
from pgd_deploy.distill import Distiller
from pgd_deploy.models import build_detector


def _measure(
    step: Callable[[], None], device: torch.device, iters: int, warmup: int
) -> tuple[float, int]:
    """(median seconds per step, peak bytes allocated) of `step`."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return statistics.median(times), peak


def run(device: torch.device, height: int, width: int, batch: int, iters: int, warmup: int) -> None:
    torch.manual_seed(0)
    teacher = build_detector(ModelConfig(depth=101), NUM_CLASSES).to(device)
    student = build_detector(ModelConfig(depth=50), NUM_CLASSES).to(device).train()
    distiller = Distiller(teacher=teacher)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    images = torch.randn(batch, 3, height, width, device=device)
    targets = [
        {k: v.to(device) for k, v in t.items()}
        for t in random_targets(batch, 8, height, width, seed=0)
    ]

    def step(pgd: bool) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if not pgd:
                distiller.teacher_forward(images)
            outputs = student(images)
            losses = student.loss(outputs, targets)
            if pgd:
                losses.update(distiller(images, outputs, targets))
            loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"[{name}] FCOS R101 -> R50, {height}x{width}, batch {batch}, bf16 autocast")
    results = {}
    for label, pgd in (("(a) plain", False), ("(b) PGD", True)):
        seconds, peak = _measure(lambda pgd=pgd: step(pgd), device, iters, warmup)
        results[label] = seconds
        print(
            f"  {label:10s} {seconds * 1e3:8.1f} ms/iter  {batch / seconds:7.2f} images/s  "
            f"peak memory {peak / 2**30:6.2f} GiB"
        )
    print(f"  (b) / (a) = {results['(b) PGD'] / results['(a) plain']:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("pgd_gpu.py: CUDA is not available; nothing to measure.")
        return 0
    run(torch.device("cuda"), 800, 1344, args.batch, args.iters, args.warmup)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
