"""Cost of PGD on top of plain training: FCOS R101 teacher -> R50 student, random weights.

(a) teacher forward (no grad) + student training step without KD (what an engine that merely
    runs the teacher would pay); (b) the full PGD step: the same plus the masks, the 10 KD losses
    and their backward. Both run interleaved (a, b, a, b, ...) so that a noisy machine hurts
    them alike; medians are reported. The mask computation alone (100 GT boxes per image) is
    timed as a fraction of (b).

The KD terms alone (masks and the 10 losses on the student's taps, forward, and their backward
down to the taps, with the teacher's outputs at hand) are timed apart as a fraction of (b): the
work PGD adds that is not the teacher's forward.

`--amp bf16` runs both steps' forward and losses under bf16 autocast, as `pgd-train` does with
`train.amp = "auto"` on a CPU with avx512_bf16 or AMX (or a CUDA GPU); the default `off` is fp32,
what training runs on a CPU without bf16 instructions (where bf16 is emulated, and slow).

CPU: 320x320, batch 2. CUDA (when available): 800x1333 (padded to 800x1344), batch 8.
The last line printed is `overhead ratio: X.XX`, the CPU figure: the median over rounds of
(b) / (a) within the round (robust to a machine whose speed drifts); with CUDA, the line
`overhead ratio (CUDA): X.XX` comes first.

    python bench/pgd_overhead.py [--iters 5] [--warmup 2] [--amp off|bf16] [--no-cuda] [--no-cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

from pgd_deploy.config import ModelConfig
from pgd_deploy.distill import Distiller
from pgd_deploy.engine import weighted_sum
from pgd_deploy.models import build_detector

NUM_CLASSES = 80


def random_targets(batch: int, boxes: int, height: int, width: int, seed: int) -> list[dict]:
    """`boxes` random xyxy boxes (5-55 % of the image side) and labels per image."""
    gen = torch.Generator().manual_seed(seed)
    size = torch.tensor([width, height], dtype=torch.float32)
    out = []
    for _ in range(batch):
        xy = torch.rand(boxes, 2, generator=gen) * size * 0.8
        wh = (torch.rand(boxes, 2, generator=gen) * 0.5 + 0.05) * size
        box = torch.cat([xy, (xy + wh).minimum(size - 1)], dim=1)
        out.append({"boxes": box, "labels": torch.randint(0, NUM_CLASSES, (boxes,), generator=gen)})
    return out


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of `fn`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def run(
    device: torch.device,
    height: int,
    width: int,
    batch: int,
    iters: int,
    warmup: int,
    amp: str = "off",
) -> float:
    """Print the timings on `device`; return the overhead ratio (b) / (a)."""
    torch.manual_seed(0)
    teacher = build_detector(ModelConfig(depth=101), NUM_CLASSES).to(device)
    student = build_detector(ModelConfig(depth=50), NUM_CLASSES).to(device).train()
    distiller = Distiller(teacher=teacher)  # the released FCOS hyperparameters
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    images = torch.randn(batch, 3, height, width, device=device)
    targets = [
        {k: v.to(device) for k, v in t.items()}
        for t in random_targets(batch, 8, height, width, seed=0)
    ]

    def autocast():  # as engine.train_step: forward and losses, not backward
        if amp == "off":
            return nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def step_plain() -> None:
        with autocast():
            distiller.teacher_forward(images)
            outputs = student(images)
            loss = sum(v.float() for v in student.loss(outputs, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def step_pgd() -> None:
        with autocast():
            outputs = student(images)
            losses = {**student.loss(outputs, targets), **distiller(images, outputs, targets)}
        loss = weighted_sum({k: v.float() for k, v in losses.items()}, distiller.loss_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step_plain()
        step_pgd()
    plain, pgd, plain_cpu, pgd_cpu = [], [], [], []
    for _ in range(iters):
        for fn, wall, cpu in ((step_plain, plain, plain_cpu), (step_pgd, pgd, pgd_cpu)):
            seconds, cpu_seconds = _timed(fn, device)
            wall.append(seconds)
            cpu.append(cpu_seconds)
    t_plain, t_pgd = statistics.median(plain), statistics.median(pgd)

    many = [
        {k: v.to(device) for k, v in t.items()}
        for t in random_targets(batch, 100, height, width, seed=1)
    ]
    with autocast():
        teacher_outputs = distiller.teacher_forward(images)
        with torch.no_grad():
            taps = student(images)
    for _ in range(warmup):
        distiller.masks(teacher_outputs, many)
    t_masks = statistics.median(
        _timed(lambda: distiller.masks(teacher_outputs, many), device)[0] for _ in range(iters)
    )
    kd_alone = _KdAlone(distiller, teacher_outputs, taps, images, targets, autocast)
    for _ in range(warmup):
        kd_alone()
    t_kd = statistics.median(_timed(kd_alone, device)[0] for _ in range(iters))
    # the headline: the median over rounds of (b) / (a) within a round, robust to a machine
    # whose speed drifts between rounds (a shared 2-core VM's spread is 15 % and more)
    ratio = statistics.median(b / a for a, b in zip(plain, pgd, strict=True))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"[{name}] {height}x{width}, batch {batch}, {iters} timed iterations (medians)")
    print(f"  (a) teacher fwd + student step:  {t_plain * 1e3:9.1f} ms  {_spread(plain)}")
    print(f"  (b) full PGD step:               {t_pgd * 1e3:9.1f} ms  {_spread(pgd)}")
    print(
        f"  masks alone, 100 GT/image:       {t_masks * 1e3:9.1f} ms = {t_masks / t_pgd:.1%} of (b)"
    )
    print(f"  KD terms alone, fwd + bwd to taps: {t_kd * 1e3:9.1f} ms = {t_kd / t_pgd:.1%} of (b)")
    print(f"  (b) / (a) = {t_pgd / t_plain:.3f} wall clock, of the medians ({amp_name(amp)})")
    print(f"  (b) / (a) = {ratio:.3f} wall clock, median of the rounds' ratios")
    if device.type == "cpu":  # process CPU time: less sensitive to other loads on the machine
        cpu_ratio = statistics.median(pgd_cpu) / statistics.median(plain_cpu)
        print(f"  (b) / (a) = {cpu_ratio:.3f} process CPU time, {torch.get_num_threads()} threads")
    return ratio


class _KdAlone:
    """The distiller's masks, losses and their backward on leaf copies of the student's taps
    (so the backward stops there), with the teacher's outputs computed once."""

    def __init__(self, distiller, teacher_outputs, student_outputs, images, targets, autocast):
        self.distiller, self.images, self.targets = distiller, images, targets
        self.teacher_outputs, self.student_outputs = teacher_outputs, student_outputs
        self.autocast = autocast

    def __call__(self) -> None:
        leaf = [t.detach().requires_grad_(True) for t in self.student_outputs.cls_taps]
        leaf_reg = [t.detach().requires_grad_(True) for t in self.student_outputs.reg_taps]
        outputs = self.student_outputs._replace(cls_taps=leaf, reg_taps=leaf_reg)
        forward = self.distiller.teacher_forward
        self.distiller.teacher_forward = lambda images: self.teacher_outputs
        try:
            with self.autocast():
                losses = self.distiller(self.images, outputs, self.targets)
        finally:
            self.distiller.teacher_forward = forward
        weighted_sum(
            {k: v.float() for k, v in losses.items()}, self.distiller.loss_weights
        ).backward()


def amp_name(amp: str) -> str:
    return "fp32" if amp == "off" else "bf16 autocast"


def _spread(times: list[float]) -> str:
    return f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--amp", choices=("off", "bf16"), default="off", help="autocast of both steps"
    )
    args = parser.parse_args()
    if args.cuda and torch.cuda.is_available():
        cuda_ratio = run(torch.device("cuda"), 800, 1344, 8, args.iters, args.warmup, args.amp)
        print(f"overhead ratio (CUDA): {cuda_ratio:.2f}")
    if args.cpu:
        cpu_ratio = run(torch.device("cpu"), 320, 320, 2, args.iters, args.warmup, args.amp)
        print(f"overhead ratio: {cpu_ratio:.2f}")


if __name__ == "__main__":
    main()
