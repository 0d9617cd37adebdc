"""ATSS assignment time on a COCO-sized image: `atss_assign` against a per-GT loop, side by side.

    python bench/atss_assign.py [--gts 50] [--size 800x1344] [--threads 1] [--rounds 20]

The anchors are ATSS's (one 8-stride square per location of P3-P7 at the input size); the GTs are
random boxes (4 to 304 px) inside the image, seeded. The two implementations run interleaved,
round after round, on the same inputs, and must agree; printed: the median and minimum of each
and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from pgd_deploy.models import ATSSHead, atss_assign
from pgd_deploy.models.atss import INSIDE_EPS, aligned_iou

STRIDES = (8, 16, 32, 64, 128)


def per_gt_loop(anchors: torch.Tensor, level_sizes, gts: torch.Tensor, topk: int = 9):
    """ATSS written as MMDetection's assigner reads, one GT after another."""
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    best = torch.full((len(anchors),), -math.inf)
    owner = torch.full((len(anchors),), -1)
    for g, gt in enumerate(gts):
        iou = aligned_iou(anchors, gt.expand_as(anchors))
        dist = (centers - (gt[:2] + gt[2:]) / 2).norm(dim=1)
        cands, start = [], 0
        for n in level_sizes:
            cands.append(dist[start : start + n].topk(min(topk, n), largest=False).indices + start)
            start += n
        cand = torch.cat(cands)
        c = centers[cand]
        margin = torch.stack([c[:, 0] - gt[0], c[:, 1] - gt[1], gt[2] - c[:, 0], gt[3] - c[:, 1]])
        pos = cand[
            (iou[cand] >= iou[cand].mean() + iou[cand].std()) & (margin.amin(0) > INSIDE_EPS)
        ]
        better = iou[pos] > best[pos]
        best[pos[better]], owner[pos[better]] = iou[pos[better]], g
    return owner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gts", type=int, default=50)
    parser.add_argument("--size", default="800x1344")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.split("x"))
    sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in STRIDES]
    priors = ATSSHead(num_classes=80, channels=32, num_convs=1).priors(sizes, STRIDES, "cpu")
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(args.gts, 2, generator=gen) * torch.tensor([w - 304.0, h - 304.0])
    gts = torch.cat([xy, xy + torch.rand(args.gts, 2, generator=gen) * 300 + 4], dim=1)
    anchors, levels = priors.anchors, priors.level_sizes
    runs = {
        "atss_assign": lambda: atss_assign(anchors, levels, gts),
        "per-GT loop": lambda: per_gt_loop(anchors, levels, gts),
    }
    assert torch.equal(runs["atss_assign"](), runs["per-GT loop"]())
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    print(
        f"ATSS assignment, {len(anchors)} anchors ({args.size}), {args.gts} GTs, "
        f"{args.threads} thread(s), {args.rounds} interleaved rounds"
    )
    for name, ts in times.items():
        print(
            f"  {name:12s} median {statistics.median(ts) * 1e3:7.1f} ms"
            f"   min {min(ts) * 1e3:7.1f} ms"
        )
    ratio = statistics.median(times["per-GT loop"]) / statistics.median(times["atss_assign"])
    print(f"  per-GT loop / atss_assign: {ratio:.1f}x")


if __name__ == "__main__":
    main()
