"""Training-step throughput of FCOS R50 and R101, measured side by side in one run.

    python bench/train_step.py [--size 512] [--batch 2] [--iters 5] [--amp auto|bf16|fp16|off]

Runs on CUDA when available, else on the CPU. Steps of the two models are interleaved so that
machine noise hits both alike; prints images/s of each and the ratio of R101 to R50 step time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pgd_deploy.config import ModelConfig
from pgd_deploy.devices import autocast_setup
from pgd_deploy.models import build_detector


def make_step(depth: int, images: torch.Tensor, targets, device, amp_dtype):
    torch.manual_seed(0)
    model = build_detector(ModelConfig(depth=depth), num_classes=80).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            losses = model.loss(model(images), targets)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--size", type=int, default=None, help="square input side (default 320 CPU, 800 GPU)"
    )
    p.add_argument("--batch", type=int, default=None, help="batch (default 2 CPU, 8 GPU)")
    p.add_argument("--iters", type=int, default=5, help="timed steps per model")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or (800 if device.type == "cuda" else 320)
    batch = args.batch or (8 if device.type == "cuda" else 2)
    amp_dtype, _ = autocast_setup(args.amp, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    images = torch.randn(batch, 3, size, size, device=device)
    box = torch.tensor([[0.1, 0.1, 0.6, 0.7], [0.4, 0.3, 0.9, 0.8]], device=device) * size
    targets = [{"boxes": box, "labels": torch.tensor([3, 17], device=device)}] * batch
    steps = {d: make_step(d, images, targets, device, amp_dtype) for d in (50, 101)}
    for step in steps.values():  # warm-up (cudnn autotuning, allocator)
        step()
        step()
    times: dict[int, list[float]] = {50: [], 101: []}
    for _ in range(args.iters):
        for depth, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[depth].append(time.perf_counter() - t0)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device {name}, input {size}x{size}, batch {batch}, amp {amp_dtype}")
    for depth in (50, 101):
        med = statistics.median(times[depth])
        print(f"FCOS R{depth:<3} step {1000 * med:8.1f} ms   {batch / med:7.2f} images/s")
    ratio = statistics.median(times[101]) / statistics.median(times[50])
    print(f"step time ratio R101/R50: {ratio:.2f}")


if __name__ == "__main__":
    main()
