"""The quickstart (`make demo`): teacher, baseline student and PGD student on synthetic shapes.

Trains the three quickstart recipes one after the other, then measures each model and prints a
scoreboard (AP, AP50, parameters, CPU latency per image), also written as
`WORK_DIR/scoreboard.json`. A stage whose work folder already holds a finished run with the same
resolved configuration is reused, so re-running the demo is cheap; an unfinished run of the same
configuration (an interrupted demo) is continued from its last.pt, and a run of another
configuration is replaced (the stage folders belong to the demo).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pgd_deploy.config import TrainJob, dumps_toml, load_config
from pgd_deploy.io_utils import write_json
from pgd_deploy.models import load_detector
from pgd_deploy.runtime.timing import measure
from pgd_deploy.trainer import fit
from pgd_deploy.workdir import run_files

logger = logging.getLogger(__name__)

STAGES = (
    ("teacher", "quickstart_teacher"),
    ("student", "quickstart_student"),
    ("pgd", "quickstart_pgd"),
)


def _recipes_dir(recipes: str | Path | None) -> Path:
    folder = Path(recipes) if recipes else Path("train")
    if not (folder / "quickstart_teacher.toml").is_file():
        raise FileNotFoundError(
            f"{folder}/quickstart_teacher.toml not found: run from the repository root or pass "
            "--recipes pointing at the folder with the quickstart_*.toml recipes"
        )
    return folder


def _finished(work_dir: Path, cfg: TrainJob) -> bool:
    """True when `work_dir` holds a completed run of exactly `cfg`."""
    if not ((work_dir / "metrics.json").is_file() and (work_dir / "best.pt").is_file()):
        return False
    return _same_config(work_dir, cfg)


def _same_config(work_dir: Path, cfg: TrainJob) -> bool:
    """True when `work_dir/config.toml` is `cfg` (up to the num_classes resolved from data)."""
    saved = work_dir / "config.toml"
    try:
        previous = load_config(TrainJob, saved)
    except (ValueError, FileNotFoundError):
        return False
    # The saved config has num_classes resolved from the data; compare the rest.
    import dataclasses

    return dumps_toml(
        dataclasses.replace(
            previous, model=dataclasses.replace(previous.model, num_classes=cfg.model.num_classes)
        )
    ) == dumps_toml(cfg)


def cpu_latencies_ms(checkpoints: Sequence[Path], size: int, *, rounds: int = 8) -> list[float]:
    """Median single-image CPU latency (forward + decode + post-processing) of each checkpoint, ms.

    The models are timed round-robin (a few runs each per round) so that machine noise hits all
    of them alike; the ratios between them are what the scoreboard is for.
    """
    models = [load_detector(path, device="cpu").detector for path in checkpoints]
    images = torch.randn(1, 3, size, size)
    samples: list[list[float]] = [[] for _ in models]
    for model in models:  # warm-up
        measure(lambda m=model: m.predict(images, [None]), warmup=3, iters=1)
    for _ in range(rounds):
        for model, out in zip(models, samples):
            stats = measure(lambda m=model: m.predict(images, [None]), warmup=0, iters=5)
            out.append(stats.p50)
    return [float(np.median(s)) for s in samples]


def score(name: str, work_dir: Path, cfg: TrainJob, latency_ms: float) -> dict[str, Any]:
    import json

    metrics = json.loads((work_dir / "metrics.json").read_text())
    loaded = load_detector(work_dir / "best.pt", device="cpu")
    model, state = loaded.detector, loaded.checkpoint
    return {
        "name": name,
        "AP": round(metrics.get("AP", 0.0), 4),
        "AP50": round(metrics.get("AP50", 0.0), 4),
        "params": sum(p.numel() for p in model.parameters()),
        "cpu_ms_per_image": round(latency_ms, 2),
        "train_iters": int(state["iteration"]),
        "seed": cfg.train.seed,
        "depth": cfg.model.depth,
        "checkpoint": str(work_dir / "best.pt"),
    }


def format_scoreboard(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        f"{'model':<8} {'depth':>5} {'AP':>6} {'AP50':>6} {'params':>8} {'CPU ms/img':>10} "
        f"{'iters':>6} {'seed':>4}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['name']:<8} {'R' + str(r['depth']):>5} {100 * r['AP']:6.1f} "
            f"{100 * r['AP50']:6.1f} {r['params'] / 1e6:7.1f}M {r['cpu_ms_per_image']:10.1f} "
            f"{r['train_iters']:6d} {r['seed']:4d}"
        )
    return "\n".join(lines)


def _train_stage(name: str, recipe: str, cfg: TrainJob, stage_dir: Path) -> None:
    """Reuse a finished run of `cfg` in `stage_dir`, continue an unfinished one, else train
    (replacing a run of another configuration)."""
    if _finished(stage_dir, cfg):
        logger.info("%s: reusing the finished run in %s (delete it to retrain)", name, stage_dir)
        return
    resume = (stage_dir / "last.pt").is_file() and _same_config(stage_dir, cfg)
    overwrite = not resume and bool(run_files(stage_dir))
    if resume:
        logger.info("%s: continuing the unfinished run in %s", name, stage_dir)
    elif overwrite:
        logger.info("%s: replacing the run in %s (another configuration)", name, stage_dir)
    else:
        logger.info("%s: training %s into %s", name, recipe, stage_dir)
    result = fit(cfg, work_dir=stage_dir, resume=resume, overwrite=overwrite)
    if not result.completed:
        raise RuntimeError(f"{name} training stopped: {result.message}")


def run_demo(
    work_dir: str | Path = "runs/demo",
    *,
    overrides: Sequence[str] = (),
    recipes: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Train (or reuse) the three quickstart models and write the scoreboard."""
    work_dir = Path(work_dir)
    folder = _recipes_dir(recipes)
    start = time.perf_counter()
    runs: list[tuple[str, Path, TrainJob]] = []
    for name, recipe in STAGES:
        extra = list(overrides)
        if name == "pgd":
            extra.append(f"distill.teacher='{work_dir / 'teacher' / 'best.pt'}'")
        cfg = load_config(TrainJob, folder / f"{recipe}.toml", extra)
        stage_dir = work_dir / name
        _train_stage(name, recipe, cfg, stage_dir)
        runs.append((name, stage_dir, cfg))
    size = -(-runs[0][2].data.max_size // 32) * 32
    latencies = cpu_latencies_ms([d / "best.pt" for _, d, _ in runs], size)
    rows = [score(name, d, cfg, ms) for (name, d, cfg), ms in zip(runs, latencies)]
    write_json(work_dir / "scoreboard.json", rows)
    minutes = (time.perf_counter() - start) / 60
    print(f"\nquickstart scoreboard (synthetic shapes validation split), {minutes:.1f} min\n")
    print(format_scoreboard(rows))
    print(f"\nwritten to {work_dir / 'scoreboard.json'}")
    return rows
