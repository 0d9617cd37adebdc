"""PGD training throughput on a CUDA GPU: FCOS R101 teacher -> R50 student, bf16 autocast.

Runs a few iterations of (a) the plain step (teacher forward without grad + student step without
KD) and (b) the full PGD step at 800x1333 (padded to 800x1344), batch 8, random weights, and
prints images/s and the peak memory (`torch.cuda.max_memory_allocated`) of each, for four set-ups
measured in the same run:

- `trainable BN`: backbones built with `model.weights=none`, BatchNorm trained (the synthetic
  quickstart's set-up);
- `frozen BN (torchvision)`: backbones loaded from a (random) ResNet state dict file, so BatchNorm
  and the stem + layer1 are frozen as in the COCO recipes, which start from ImageNet weights,
  with torchvision's FrozenBatchNorm2d (fp32 output under autocast);
- `frozen BN`: the same with this project's FrozenBN (output in the autocast dtype), as trained;
- `frozen BN, channels_last`: the same with models and images in channels-last memory format
  (`train.channels_last`, on by default on CUDA).

Exits 0 with a message where CUDA is not available.

    python bench/pgd_gpu.py [--iters 10] [--warmup 3] [--batch 8] [--profile]

`--profile` also prints the operators of three PGD steps of the last set-up that take the most
GPU time (torch.profiler).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from pgd_overhead import NUM_CLASSES, random_targets  # bench/ is on sys.path as a script
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from pgd_deploy.config import ModelConfig
from pgd_deploy.distill import Distiller
from pgd_deploy.engine import weighted_sum
from pgd_deploy.models import build_detector
from pgd_deploy.models.backbone import FrozenBN


def _measure(
    step: Callable[[], None], device: torch.device, iters: int, warmup: int
) -> tuple[float, int]:
    """(median seconds per step, peak bytes allocated) of `step`."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), torch.cuda.max_memory_allocated(device)


def _weights_file(folder: Path, depth: int) -> str:
    """A random-init ResNet state dict saved to a file: loading it freezes BN as in COCO runs."""
    path = folder / f"resnet{depth}.pt"
    torch.save(torchvision.models.get_model(f"resnet{depth}", weights=None).state_dict(), path)
    return str(path)


def _stock_frozen_bn(module: nn.Module) -> nn.Module:
    """Swap this project's FrozenBN for torchvision's FrozenBatchNorm2d (same buffers)."""
    for name, child in module.named_children():
        if isinstance(child, FrozenBN):
            stock = FrozenBatchNorm2d(child.weight.numel(), eps=child.eps)
            stock.load_state_dict(child.state_dict())
            setattr(module, name, stock)
        else:
            _stock_frozen_bn(child)
    return module


def run_setup(
    label: str,
    device: torch.device,
    size: tuple[int, int],
    batch: int,
    iters: int,
    warmup: int,
    weights: dict[int, str],
    channels_last: bool,
    profile: bool,
    stock_bn: bool = False,
) -> dict[str, float]:
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    teacher = build_detector(ModelConfig(depth=101, weights=weights.get(101, "none")), NUM_CLASSES)
    student = build_detector(ModelConfig(depth=50, weights=weights.get(50, "none")), NUM_CLASSES)
    if stock_bn:
        teacher, student = _stock_frozen_bn(teacher), _stock_frozen_bn(student)
    teacher = teacher.to(device, memory_format=fmt)
    student = student.to(device, memory_format=fmt).train()
    distiller = Distiller(teacher=teacher)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    images = torch.randn(batch, 3, *size, device=device).contiguous(memory_format=fmt)
    targets = [
        {k: v.to(device) for k, v in t.items()} for t in random_targets(batch, 8, *size, seed=0)
    ]

    def step(pgd: bool) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if not pgd:
                distiller.teacher_forward(images)
            outputs = student(images)
            losses = student.loss(outputs, targets)
            if pgd:
                losses.update(distiller(images, outputs, targets))
            loss = weighted_sum(losses, distiller.loss_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    results = {}
    for name, pgd in (("plain", False), ("pgd", True)):
        seconds, peak = _measure(lambda pgd=pgd: step(pgd), device, iters, warmup)
        results[name] = batch / seconds
        print(
            f"  {label:26s} {'(b) PGD' if pgd else '(a) plain':9s} {seconds * 1e3:7.1f} ms/iter "
            f"{batch / seconds:7.2f} images/s  peak {peak / 2**30:5.2f} GiB",
            flush=True,
        )
    if profile:
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(3):
                step(True)
            torch.cuda.synchronize(device)
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=15))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="print a profile of PGD steps")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("pgd_gpu.py: CUDA is not available; nothing to measure.")
        return 0
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True  # as the trainer sets it on CUDA
    size = (800, 1344)
    print(
        f"[{torch.cuda.get_device_name(device)}] FCOS R101 -> R50, {size[0]}x{size[1]}, "
        f"batch {args.batch}, bf16 autocast, medians of {args.iters} iterations"
    )
    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        frozen = {depth: _weights_file(Path(tmp), depth) for depth in (50, 101)}
        setups = (
            ("trainable BN", {}, False, False),
            ("frozen BN (torchvision)", frozen, False, True),
            ("frozen BN", frozen, False, False),
            ("frozen BN, channels_last", frozen, True, False),
        )
        for i, (label, weights, channels_last, stock_bn) in enumerate(setups):
            table[label] = run_setup(
                label,
                device,
                size,
                args.batch,
                args.iters,
                args.warmup,
                weights,
                channels_last,
                args.profile and i == len(setups) - 1,
                stock_bn,
            )
    print(f"\n{'set-up':26s} {'plain img/s':>12s} {'PGD img/s':>10s} {'PGD/plain time':>15s}")
    for label, r in table.items():
        print(f"{label:26s} {r['plain']:12.2f} {r['pgd']:10.2f} {r['plain'] / r['pgd']:15.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
