"""Training-step throughput of FCOS R50 and R101 at one or more precisions, side by side.

    python bench/train_step.py [--size 512] [--batch 2] [--iters 5] [--amp off,bf16]
    python bench/train_step.py --size 128 --batch 8 --amp off,bf16       # the quickstart's steps
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI python bench/train_step.py ...    # as a CPU without bf16

Runs on CUDA when available, else on the CPU. The steps of every (model, precision) pair are
interleaved so that machine noise hits them alike; prints images/s of each, the ratio of R101 to
R50 step time and, with several precisions, each one's step time relative to the first. This is
the measurement behind `train.amp = "auto"` on the CPU (bf16 where the CPU has bf16 instructions,
`pgd_deploy.devices.cpu_bf16_isa`); ONEDNN_MAX_CPU_ISA hides those instructions from oneDNN, so one
machine shows both sides.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from pgd_deploy.config import ModelConfig
from pgd_deploy.devices import autocast_setup, cpu_bf16_isa
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
    p.add_argument("--iters", type=int, default=5, help="timed steps per model and precision")
    p.add_argument(
        "--amp",
        default="auto",
        help="train.amp value(s), comma-separated (auto, bf16, fp16, off), e.g. off,bf16",
    )
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or (800 if device.type == "cuda" else 320)
    batch = args.batch or (8 if device.type == "cuda" else 2)
    amps = [a.strip() for a in args.amp.split(",") if a.strip()]
    for amp in amps:
        if amp not in ("auto", "bf16", "fp16", "off"):
            p.error(f"--amp: {amp!r} is not one of auto, bf16, fp16, off")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    images = torch.randn(batch, 3, size, size, device=device)
    box = torch.tensor([[0.1, 0.1, 0.6, 0.7], [0.4, 0.3, 0.9, 0.8]], device=device) * size
    targets = [{"boxes": box, "labels": torch.tensor([3, 17], device=device)}] * batch
    dtypes = {amp: autocast_setup(amp, device)[0] for amp in amps}
    steps = {
        (d, amp): make_step(d, images, targets, device, dtypes[amp])
        for amp in amps
        for d in (50, 101)
    }
    for step in steps.values():  # warm-up (cudnn autotuning, allocator, oneDNN primitives)
        step()
        step()
    times: dict[tuple[int, str], list[float]] = {key: [] for key in steps}
    for _ in range(args.iters):
        for key, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - t0)
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
    else:
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
        name = f"CPU ({torch.get_num_threads()} threads, bf16 ISA: {cpu_bf16_isa() or 'none'}" + (
            f", ONEDNN_MAX_CPU_ISA={isa})" if isa else ")"
        )
    print(f"device {name}, input {size}x{size}, batch {batch}")
    med = {key: statistics.median(t) for key, t in times.items()}
    vs = "vs " + amps[0]
    print(f"{'model':<10} {'amp':<5} {'dtype':<15} {'step ms':>9} {'images/s':>9} {vs:>9}")
    for (depth, amp), m in med.items():
        rel = m / med[(depth, amps[0])]
        print(
            f"FCOS R{depth:<4} {amp:<5} {str(dtypes[amp]).replace('torch.', ''):<15} "
            f"{1000 * m:9.1f} {batch / m:9.2f} {rel:8.2f}x"
        )
    for amp in amps:
        print(f"step time ratio R101/R50 ({amp}): {med[(101, amp)] / med[(50, amp)]:.2f}")


if __name__ == "__main__":
    main()
