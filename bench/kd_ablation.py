"""Do the prediction-guided masks make the gain, or would any feature imitation do?

Trains one teacher (cached), then, for every seed, three students of the same architecture, the
same iterations, data order and initialisation (`train.seed`), none inheriting the teacher's neck
and head (`distill.init_student = false`, so only the KD losses can transfer anything):

- `none`: no distillation (the baseline student);
- `gt_box`: the PGD losses with ground-truth-box masks (`distill.masks = "gt_box"`: foreground 1
  inside any GT box, background outside all of them; FGD-style, same losses and weights);
- `pgd`: the PGD losses with the prediction-guided masks (the default).

It prints the mean +- std (over seeds) of AP and AP50 per variant and the paired differences
(same seed) with a 95 % t interval, in one table, and writes everything to JSON. Data: the
built-in synthetic shapes (generated into --out on first use). Recipes: the quickstart ones
(`train/quickstart_*.toml`) with the overrides below. Runs are cached in --out by their settings:
an interrupted ablation continues where it stopped.

The default regime is sized for about half an hour on a shared 2-core CPU: an R34 teacher trained
for 600 iterations, R18 students for 150 (a quarter), 64 px images, a 64-channel head of two
conv blocks per tower (teacher and student must share the head layout). An R50 student takes
about 1.2 s per iteration there (R18: about 0.3 s), too slow for nine runs; `--student-depth 50`
runs it where time allows. One torch thread per process by default: on 2 cores shared with other
processes, more threads were 5-10x slower.

Mind the object size. PGD's top-K (K = 30 per GT, over all levels) is selective on COCO, where a
medium object covers a few hundred locations; on the 64 px shapes an object covers about 10
(median; all of them at most 30), so the K = 30 locations take in every in-box location and the
PGD foreground is the GT-box foreground re-weighted by the Gaussian. `--topk 5` makes the
selection bite at this scale (the `gt_box` and `none` runs are shared with the K = 30 ablation).

    python bench/kd_ablation.py [--seeds 3] [--teacher-iters 600] [--student-iters 150] \\
        [--size 64] [--teacher-depth 34] [--student-depth 18] [--channels 64] [--out DIR]
    python bench/kd_ablation.py --quick     # tiny settings, about a minute (tests)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("none", "gt_box", "pgd")
DIFFERENCES = (("gt_box", "none"), ("pgd", "none"), ("pgd", "gt_box"))
# Two-sided 95 % quantiles of Student's t, by degrees of freedom (1..30; 1.96 beyond).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip

QUICK = {
    "seeds": 2,
    "teacher_iters": 20,
    "student_iters": 4,
    "size": 64,
    "teacher_depth": 18,
    "student_depth": 18,
    "channels": 32,
    "head_convs": 1,
    "train_images": 16,
    "val_images": 8,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (N >= 2)")
    p.add_argument("--teacher-iters", type=int, default=600)
    p.add_argument("--student-iters", type=int, default=150)
    p.add_argument("--size", type=int, default=64, help="synthetic image side, px")
    p.add_argument("--teacher-depth", type=int, default=34)
    p.add_argument("--student-depth", type=int, default=18)
    p.add_argument("--channels", type=int, default=64, help="FPN and head width (multiple of 32)")
    p.add_argument("--head-convs", type=int, default=2, help="conv blocks per head tower")
    p.add_argument(
        "--topk",
        type=int,
        default=None,
        help="PGD key locations per GT (default: the recipe's 30, the paper's; see above)",
    )
    p.add_argument("--train-images", type=int, default=400)
    p.add_argument("--val-images", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's)")
    p.add_argument("--out", type=Path, default=Path("runs/kd_ablation"))
    p.add_argument("--json", type=Path, default=None, help="default: OUT/kd_ablation.json")
    p.add_argument("--quick", action="store_true", help="tiny settings (tests): " + str(QUICK))
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.seeds < 2:
        p.error("--seeds must be >= 2 (a spread and an interval need two runs)")
    return args


def common_overrides(args: argparse.Namespace, depth: int, iters: int) -> list[str]:
    data = args.out / "data"
    return [
        f"model.depth={depth}",
        f"model.fpn_channels={args.channels}",
        f"model.head_convs={args.head_convs}",
        f"data.cache_dir={str(data)!r}",
        f"data.shapes_size={args.size}",
        f"data.shapes_train={args.train_images}",
        f"data.shapes_val={args.val_images}",
        f"data.min_size={args.size}",
        f"data.max_size={args.size}",
        "data.workers=0",
        f"train.max_iters={iters}",
        f"train.warmup_iters={max(1, min(50, iters // 6))}",
        "train.eval_every=0",
        f"train.log_every={max(1, iters // 10)}",
    ]


def variant_overrides(args: argparse.Namespace, variant: str, teacher: Path, seed: int):
    """(recipe, overrides) of one student run."""
    base = common_overrides(args, args.student_depth, args.student_iters) + [f"train.seed={seed}"]
    if variant == "none":
        return ROOT / "train" / "quickstart_student.toml", base
    return ROOT / "train" / "quickstart_pgd.toml", base + [
        f"distill.teacher={str(teacher)!r}",
        f"distill.teacher_depth={args.teacher_depth}",
        "distill.init_student=false",
        f"distill.masks={variant if variant == 'gt_box' else 'pgd'!r}",
        *([f"distill.topk={args.topk}"] if variant == "pgd" and args.topk else []),
    ]


def train_cached(recipe: Path, overrides: list[str], out: Path, name: str) -> dict[str, float]:
    """Train (or reuse) the run of `recipe` + `overrides` in out/name-<hash>; its COCO metrics
    and wall seconds."""
    from pgd_deploy.config import TrainJob, load_config
    from pgd_deploy.trainer import fit

    key = hashlib.sha256("\n".join([recipe.name, *overrides]).encode()).hexdigest()[:10]
    work_dir = out / f"{name}-{key}"
    done = work_dir / "ablation_run.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = load_config(TrainJob, recipe, overrides)
    start = time.perf_counter()
    result = fit(cfg, work_dir=work_dir, overwrite=True)
    if not result.completed:
        raise RuntimeError(f"{work_dir}: the run did not complete: {result.message}")
    record = {
        "AP": 100 * result.metrics["AP"],
        "AP50": 100 * result.metrics["AP50"],
        "wall_s": time.perf_counter() - start,
        "work_dir": str(work_dir),
    }
    done.write_text(json.dumps(record, indent=1))
    return record


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values), "n": len(values)}


def paired_difference(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean of a - b over seeds with its two-sided 95 % t interval."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = (T975[n - 2] if n - 1 <= len(T975) else 1.96) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def summarise(runs: list[dict]) -> tuple[dict, dict]:
    by = {
        v: [r for r in sorted(runs, key=lambda r: r["seed"]) if r["variant"] == v] for v in VARIANTS
    }
    summary = {v: {m: mean_std([r[m] for r in rs]) for m in ("AP", "AP50")} for v, rs in by.items()}
    diffs = {
        f"{a} - {b}": {
            m: paired_difference([r[m] for r in by[a]], [r[m] for r in by[b]])
            for m in ("AP", "AP50")
        }
        for a, b in DIFFERENCES
    }
    return summary, diffs


def table(args, teacher: dict, runs: list[dict], summary: dict, diffs: dict, wall_s: float) -> str:
    student = f"R{args.student_depth}"
    lines = [
        f"KD ablation: synthetic shapes {args.size} px, {args.train_images} train / "
        f"{args.val_images} val images, head {args.channels} ch x {args.head_convs} convs, "
        f"{args.seeds} seeds",
        "",
        f"{'model':<38}{'AP':>20}{'AP50':>20}",
        "-" * 78,
        f"{f'teacher R{args.teacher_depth}, {args.teacher_iters} it (seed 0)':<38}"
        f"{teacher['AP']:>20.1f}{teacher['AP50']:>20.1f}",
    ]
    names = {
        "none": "no KD",
        "gt_box": "KD, GT-box masks",
        "pgd": f"KD, PGD masks (K={args.topk or 30})",
    }
    for v in VARIANTS:
        cells = [
            f"{summary[v][m]['mean']:.1f} +- {summary[v][m]['std']:.1f}" for m in ("AP", "AP50")
        ]
        label = f"{student} {args.student_iters} it, {names[v]}"
        lines.append(f"{label:<38}{cells[0]:>20}{cells[1]:>20}")
    lines += ["", f"paired difference (same seed), mean [95% CI], n = {args.seeds}:"]
    for name, d in diffs.items():
        cells = [
            f"{d[m]['mean']:+.1f} [{d[m]['lo']:+.1f}, {d[m]['hi']:+.1f}]" for m in ("AP", "AP50")
        ]
        lines.append(f"{name:<38}{cells[0]:>20}{cells[1]:>20}")
    compute_s = teacher["wall_s"] + sum(r["wall_s"] for r in runs)
    lines += [
        "",
        f"wall time: {wall_s / 60:.1f} min this invocation; {compute_s / 60:.1f} min of training "
        "and evaluation in all (a run without cached results)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from tqdm.auto import tqdm

    if args.threads > 0:
        torch.set_num_threads(args.threads)  # 2 shared cores: oversubscribing is 5-10x slower
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(v, s) for s in range(args.seeds) for v in VARIANTS]
    bar = tqdm(total=1 + len(jobs), desc="kd ablation", unit="run", file=sys.stdout)
    teacher = train_cached(
        ROOT / "train" / "quickstart_teacher.toml",
        common_overrides(args, args.teacher_depth, args.teacher_iters),
        args.out,
        "teacher",
    )
    bar.update(1)
    teacher_ckpt = Path(teacher["work_dir"]) / "best.pt"
    runs = []
    for variant, seed in jobs:
        bar.set_postfix_str(f"{variant} seed {seed}")
        recipe, overrides = variant_overrides(args, variant, teacher_ckpt, seed)
        record = train_cached(recipe, overrides, args.out, f"{variant}-seed{seed}")
        runs.append({"variant": variant, "seed": seed, **record})
        bar.update(1)
    bar.close()
    summary, diffs = summarise(runs)
    wall_s = time.perf_counter() - start
    text = table(args, teacher, runs, summary, diffs, wall_s)
    print(text)
    out_json = args.json or args.out / "kd_ablation.json"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out_json.write_text(
        json.dumps(
            {
                "settings": settings,
                "machine": {
                    "cpu": platform.processor() or platform.machine(),
                    "torch": torch.__version__,
                },
                "teacher": teacher,
                "runs": runs,
                "summary": summary,
                "differences": diffs,
                "wall_s": wall_s,
                "table": text,
            },
            indent=1,
        )
    )
    print(f"written: {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
