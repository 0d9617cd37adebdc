"""The quickstart (`make demo`): teacher, baseline student, PGD student and its int8 version.

Trains the three quickstart recipes one after the other, then fine-tunes the PGD student with
int8 fake quantization (`quickstart_qat.toml`), exports it as an int8 ONNX for ONNX Runtime's CPU
kernels (cpu target, gated on the whole validation split), then measures each model and prints a
scoreboard (AP, AP50, parameters, CPU latency per image), also written as
`WORK_DIR/scoreboard.json`. The `pgd-int8` row is the exported ONNX run by ONNX Runtime: its AP
comes from the export's mAP gate, next to the fp32 PGD student's AP through the same evaluator
and the detection agreement between the two.

A stage whose work folder already holds a finished run with the same resolved configuration is
reused, so re-running the demo is cheap (the int8 export too, when made from the same checkpoint);
an unfinished run of the same configuration (an interrupted demo) is continued from its last.pt,
and a run of another configuration is replaced (the stage folders belong to the demo).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomllib
import torch

from pgd_deploy.checkpoint import load_checkpoint
from pgd_deploy.config import (
    DistillConfig,
    QatConfig,
    TrainJob,
    dumps_toml,
    from_dict,
    load_config,
)
from pgd_deploy.devices import describe_cpu
from pgd_deploy.io_utils import write_json
from pgd_deploy.models import load_detector
from pgd_deploy.runtime.timing import OtherLoad, RobustLatency, interleave, latency_warnings
from pgd_deploy.trainer import fit
from pgd_deploy.workdir import run_files

logger = logging.getLogger(__name__)

STAGES = (
    ("teacher", "quickstart_teacher"),
    ("student", "quickstart_student"),
    ("pgd", "quickstart_pgd"),
)
INT8_STAGE = ("pgd-int8", "quickstart_qat")  # fine-tuned from the pgd stage, then exported


def recipes_dir(recipes: str | Path | None, first: str = "quickstart_teacher") -> Path:
    """The folder of the quickstart recipes (`train/` by default), checked for `first`.toml."""
    folder = Path(recipes) if recipes else Path("train")
    if not (folder / f"{first}.toml").is_file():
        raise FileNotFoundError(
            f"{folder}/{first}.toml not found: run from the repository root or pass "
            "--recipes pointing at the folder with the quickstart_*.toml recipes"
        )
    return folder


def _finished(work_dir: Path, cfg: TrainJob) -> bool:
    """True when `work_dir` holds a completed run of exactly `cfg`."""
    if not ((work_dir / "metrics.json").is_file() and (work_dir / "best.pt").is_file()):
        return False
    return _same_config(work_dir, cfg)


def _same_config(work_dir: Path, cfg: TrainJob) -> bool:
    """True when `work_dir/config.toml` trains what `cfg` trains: equal up to the num_classes
    resolved from the data, and to the distill and qat sections of a run that uses neither (no
    teacher, no QAT init: a PGD setting does not retrain the teacher)."""
    saved = work_dir / "config.toml"
    try:  # read literally: a key it lacks had the section's default, not today's head default
        previous = from_dict(TrainJob, tomllib.loads(saved.read_text()), str(saved))
    except (ValueError, OSError, UnicodeDecodeError):
        return False
    return _what_trains(previous, cfg.model.num_classes) == _what_trains(cfg, cfg.model.num_classes)


def _what_trains(cfg: TrainJob, num_classes: int) -> str:
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=num_classes))
    if not cfg.distill.teacher:
        cfg = dataclasses.replace(cfg, distill=DistillConfig())
    if not cfg.qat.init:
        cfg = dataclasses.replace(cfg, qat=QatConfig())
    return dumps_toml(cfg)


def cpu_latencies_ms(
    checkpoints: Sequence[Path], size: int, *, onnx: Sequence[Path] = (), rounds: int = 8
) -> tuple[list[RobustLatency], OtherLoad]:
    """Single-image CPU latency (network + post-processing) of each checkpoint (PyTorch eager)
    and then of each ONNX model (ONNX Runtime, CPU), and how busy the machine was meanwhile.

    The models are timed round-robin, 5 calls each per round (`runtime.timing.interleave`): the
    figure is the median of the per-round minimums, with their interquartile range as spread, so
    that a burst of load on the machine moves neither the figures nor the ratios between them.
    """
    from pgd_deploy.runtime.backends import OrtBackend

    images = torch.randn(1, 3, size, size)
    runners = []
    for path in checkpoints:
        model = load_detector(path, device="cpu").detector
        runners.append(lambda m=model: m.predict(images, [None]))
    batch = images.numpy()
    for path in onnx:
        backend = OrtBackend(path, device="cpu")
        runners.append(lambda b=backend: b.postprocess(b.infer(batch), [None]))
    with OtherLoad() as load:
        latencies = interleave(runners, rounds=rounds, per_round=5, warmup=3)
    return latencies, load


def score(name: str, work_dir: Path, cfg: TrainJob, latency: RobustLatency) -> dict[str, Any]:
    import json

    metrics = json.loads((work_dir / "metrics.json").read_text())
    loaded = load_detector(work_dir / "best.pt", device="cpu")
    model, state = loaded.detector, loaded.checkpoint
    return {
        "name": name,
        "runtime": "torch fp32",
        "AP": round(metrics.get("AP", 0.0), 4),
        "AP50": round(metrics.get("AP50", 0.0), 4),
        "params": sum(p.numel() for p in model.parameters()),
        "cpu_ms_per_image": round(latency.ms, 2),
        "cpu_ms_spread": round(latency.spread, 2),
        "train_iters": int(state["iteration"]),
        "seed": cfg.train.seed,
        "depth": cfg.model.depth,
        "checkpoint": str(work_dir / "best.pt"),
    }


def format_scoreboard(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        f"{'model':<8} {'depth':>5} {'AP':>6} {'AP50':>6} {'params':>8} {'CPU ms/img':>13} "
        f"{'iters':>6} {'seed':>4}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        iters = f"{r['base_iters']}+{r['train_iters']}" if "base_iters" in r else r["train_iters"]
        lines.append(
            f"{r['name']:<8} {'R' + str(r['depth']):>5} {100 * r['AP']:6.1f} "
            f"{100 * r['AP50']:6.1f} {r['params'] / 1e6:7.1f}M {_latency(r):>13} "
            f"{iters:>6} {r['seed']:4d}"
        )
    return "\n".join(lines)


def _latency(row: dict[str, Any]) -> str:
    spread = row.get("cpu_ms_spread")
    return f"{row['cpu_ms_per_image']:.1f}" + (f" ±{spread:.1f}" if spread is not None else "")


def scoreboard_warnings(rows: Sequence[dict[str, Any]], load: OtherLoad | None) -> list[str]:
    """A busy machine, or two rows of one network and runtime (student and pgd) whose
    latencies differ by more than their spreads (`runtime.timing.latency_warnings`)."""
    return latency_warnings(
        [
            (r["name"], (r["depth"], r["runtime"]), r["cpu_ms_per_image"], r["cpu_ms_spread"])
            for r in rows
        ],
        load,
    )


def train_stage(name: str, recipe: str, cfg: TrainJob, stage_dir: Path) -> None:
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


def train_stages(
    stages: Sequence[tuple[str, str]], folder: Path, work_dir: Path, overrides: Sequence[str]
) -> tuple[list[tuple[str, Path, TrainJob]], dict[str, float]]:
    """Train (or reuse, `train_stage`) each (name, recipe) into `work_dir/name`, the `pgd`
    stage distilled from `work_dir/teacher/best.pt`. Returns each stage's (name, folder,
    config) and the wall-clock minutes it took (a reused run takes ~0)."""
    runs, minutes = [], {}
    teacher = f"distill.teacher='{work_dir / 'teacher' / 'best.pt'}'"
    for name, recipe in stages:
        extra = [*overrides, teacher] if name == "pgd" else list(overrides)
        cfg = load_config(TrainJob, folder / f"{recipe}.toml", extra)
        began = time.perf_counter()
        train_stage(name, recipe, cfg, work_dir / name)
        minutes[name] = (time.perf_counter() - began) / 60
        runs.append((name, work_dir / name, cfg))
    return runs, minutes


def export_int8(checkpoint: Path, cfg: TrainJob, out: Path) -> tuple[Path, dict[str, Any]]:
    """The cpu-target int8 ONNX of the QAT student, gated on the whole validation split against
    its fake quant and the fp32 PGD student; reused when a passed export of the same checkpoint
    is there. Returns (the ONNX, its manifest)."""
    path = out / "pgd-int8.onnx"
    manifest = finished_export(path, checkpoint)
    if manifest and not _gated_as_now(manifest):
        logger.info("pgd-int8: %s was gated by an older agreement gate: exporting again", path)
        manifest = None
    if manifest:
        return path, manifest
    manifest = export_on_val(
        checkpoint,
        cfg,
        out,
        "pgd-int8",
        precision="int8",
        int8_target="cpu",
        batch_opt=8,
        batch_max=8,
    )
    return path, manifest


def export_on_val(
    checkpoint: Path, cfg: TrainJob, out: Path, name: str, **fields: Any
) -> dict[str, Any]:
    """Export `checkpoint` to `out/name.onnx` at the size it trained at, gated on its whole
    validation split with its labels (`fields`: more `ExportConfig` fields, e.g. the
    precision); returns the artifact's manifest."""
    from pgd_deploy.config import ExportConfig, ExportJob
    from pgd_deploy.data.dataset import resolve_split
    from pgd_deploy.export.pipeline import run_export

    val = resolve_split(cfg.data, "val")
    size = -(-cfg.data.max_size // 32) * 32
    export = ExportConfig(
        format="onnx",
        imgsz=(size, size),
        gate_images=1_000_000,  # all of them
        val=str(val.annotations),
        val_images=str(val.images),
        out=str(out),
        name=name,
        **fields,
    )
    result = run_export(checkpoint, ExportJob(export=export))
    if not result.passed:
        logger.warning("%s: the export failed a gate, see %s", name, result.report_path)
    return result.manifests[str(out / f"{name}.onnx")]


def finished_export(path: Path, checkpoint: Path) -> dict[str, Any] | None:
    """The manifest of an export of `checkpoint` at `path` whose gates ran and which is still
    the file its manifest describes (a quickstart reuses it), else None."""
    from pgd_deploy.io_utils import file_sha256
    from pgd_deploy.runtime.manifest import read_manifest
    from pgd_deploy.runtime.verify import artifact_sha256

    manifest = read_manifest(path) if path.is_file() else None
    if not manifest or manifest.get("status") not in ("passed", "failed"):  # no gates ran
        return None
    if manifest.get("sha256") != artifact_sha256(path):
        logger.info("%s is not the file its manifest describes: exporting again", path)
        return None
    if manifest.get("source", {}).get("sha256") != file_sha256(checkpoint):
        return None  # made from another checkpoint
    logger.info("reusing the export %s (%s)", path, manifest["status"])
    return manifest


def _gated_as_now(manifest: dict[str, Any]) -> bool:
    """Whether the manifest's agreement gate measured what `int8_score` reads (since 2026-12-06:
    with the source and, reported, with fp32)."""
    results = manifest.get("gates", {}).get("results") or []
    agreement = next((r for r in results if r.get("name") == "agreement"), {})
    return "agreement_with_fp32" in agreement.get("detail", {})


def int8_score(
    onnx_path: Path,
    manifest: dict[str, Any],
    stage_dir: Path,
    cfg: TrainJob,
    latency: RobustLatency,
) -> dict[str, Any]:
    """The scoreboard row of the int8 export: AP from its mAP gate (ONNX Runtime), with the fp32
    PGD student's AP through the same evaluator and the detection agreement beside it."""
    results = {r["name"]: r for r in manifest["gates"]["results"]}
    ap = results["map"]["detail"]
    agreement = results["agreement"]["detail"]
    loaded = load_detector(stage_dir / "best.pt", device="cpu")
    model, state = loaded.detector, loaded.checkpoint
    init = load_checkpoint(cfg.qat.init)
    return {
        "name": INT8_STAGE[0],
        "runtime": "onnxruntime int8 (cpu target)",
        "AP": round(ap["exported"]["AP"], 4),
        "AP50": round(ap["exported"]["AP50"], 4),
        "params": sum(p.numel() for p in model.parameters()),
        "cpu_ms_per_image": round(latency.ms, 2),
        "cpu_ms_spread": round(latency.spread, 2),
        "train_iters": int(state["iteration"]),
        "base_iters": int(init["iteration"]),
        "seed": cfg.train.seed,
        "depth": cfg.model.depth,
        "checkpoint": str(onnx_path),
        "gates": manifest["status"],
        "fp32_AP_same_evaluator": round(ap["reference"]["AP"], 4),
        # the gate's: with the model the export reproduces (the QAT fake-quant model)
        "agreement_with_source": round(agreement["agreement"], 4),
        "agreement_with_source_iou": agreement["iou"],
        "agreement_with_source_min": agreement["minimum"],
        # reported: with the fp32 PGD student it was fine-tuned from (mAP judges int8 vs fp32)
        "agreement_with_fp32": round(agreement["agreement_with_fp32"], 4),
        "agreement_with_fp32_iou": agreement["agreement_with_fp32_iou"],
    }


def int8_note(row: dict[str, Any]) -> str:
    """What the pgd-int8 row is, and how it compares with the fp32 PGD student."""
    return (
        f"pgd-int8: the pgd student fine-tuned {row['train_iters']} iterations with int8 fake "
        f"quantization and PGD ({INT8_STAGE[1]}.toml), exported as int8 ONNX (cpu target) and run "
        f"by ONNX Runtime. Against the fp32 pgd student on the same images and evaluator: "
        f"AP {100 * row['AP']:.2f} vs {100 * row['fp32_AP_same_evaluator']:.2f}. Detection "
        f"agreement (same class) with its source, the fake-quant model QAT trained: "
        f"{row['agreement_with_source']:.3f} at IoU {row['agreement_with_source_iou']:g} (the "
        f"gate, >= {row['agreement_with_source_min']:g}); with the fp32 pgd student: "
        f"{row['agreement_with_fp32']:.3f} at IoU {row['agreement_with_fp32_iou']:g} (reported); "
        f"gates {row['gates']}."
    )


def run_quickstart(
    work_dir: str | Path = "runs/demo",
    *,
    overrides: Sequence[str] = (),
    recipes: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Train (or reuse) the quickstart models, export the int8 one and write the scoreboard."""
    work_dir = Path(work_dir)
    folder = recipes_dir(recipes)
    start = time.perf_counter()
    runs, minutes_per_stage = train_stages(STAGES, folder, work_dir, overrides)
    teacher = f"distill.teacher='{work_dir / 'teacher' / 'best.pt'}'"
    began = time.perf_counter()
    int8_name, recipe = INT8_STAGE
    int8_dir = work_dir / int8_name
    qat_init = f"qat.init='{work_dir / 'pgd' / 'best.pt'}'"
    qat_cfg = load_config(TrainJob, folder / f"{recipe}.toml", [*overrides, teacher, qat_init])
    train_stage(int8_name, recipe, qat_cfg, int8_dir)
    onnx_path, manifest = export_int8(int8_dir / "best.pt", qat_cfg, int8_dir)
    size = -(-runs[0][2].data.max_size // 32) * 32
    checkpoints = [d / "best.pt" for _, d, _ in runs]
    latencies, load = cpu_latencies_ms(checkpoints, size, onnx=[onnx_path])
    rows = [score(name, d, cfg, ms) for (name, d, cfg), ms in zip(runs, latencies)]
    rows.append(int8_score(onnx_path, manifest, int8_dir, qat_cfg, latencies[-1]))
    write_json(work_dir / "scoreboard.json", rows)
    minutes_per_stage["int8 (QAT, export, latencies)"] = (time.perf_counter() - began) / 60
    minutes = (time.perf_counter() - start) / 60
    print(f"\nquickstart scoreboard (synthetic shapes validation split), {minutes:.1f} min\n")
    print(format_scoreboard(rows))
    print(
        "CPU ms/img: single image, network + post-processing, median over 8 interleaved rounds "
        "of each round's fastest of 5 calls, ± the interquartile range of those"
    )
    for warning in scoreboard_warnings(rows, load):
        print(f"WARNING: {warning}")
    print(f"\n{int8_note(rows[-1])}")
    print("\nminutes: " + ", ".join(f"{k} {v:.1f}" for k, v in minutes_per_stage.items()))
    print(f"measured on: {describe_cpu()}")  # the kernels decide the figures (bf16 or fp32)
    print(f"\nwritten to {work_dir / 'scoreboard.json'}")
    return rows
