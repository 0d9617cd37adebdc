"""The crowd quickstart (`pgd-train demo --crowd`): PGD on crowded scenes, scored as CrowdHuman.

Trains the three `quickstart_crowd_*.toml` recipes (teacher, baseline student, PGD student) on the
synthetic crowd (`data.shapes_crowd`: overlapping figures of one class, ignore regions, odgt
converted as CrowdHuman is), evaluates each with MR^-2, AP and JI (`data.metric = "crowd"`), then
exports the PGD student to fp32 ONNX and gates it on the whole validation split, its mAP gate
measured in MR^-2 and AP. Prints a table and writes `WORK_DIR/scoreboard.json`.

Stages reuse a finished run of the same configuration and continue an unfinished one, as the
main quickstart's do (`quickstart.train_stage`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pgd_deploy.config import TrainJob
from pgd_deploy.devices import describe_cpu
from pgd_deploy.io_utils import write_json
from pgd_deploy.models import load_detector
from pgd_deploy.quickstart import export_on_val, finished_export, recipes_dir, train_stages

STAGES = (
    ("teacher", "quickstart_crowd_teacher"),
    ("student", "quickstart_crowd_student"),
    ("pgd", "quickstart_crowd_pgd"),
)


def crowd_row(name: str, work_dir: Path, cfg: TrainJob) -> dict[str, Any]:
    """A trained stage's scoreboard row: its final crowd metrics, size and training length."""
    metrics = json.loads((work_dir / "metrics.json").read_text())
    loaded = load_detector(work_dir / "best.pt", device="cpu")
    return {
        "name": name,
        "runtime": "torch fp32",
        "MR2": round(metrics["MR2"], 4),
        "AP": round(metrics["AP"], 4),
        "JI": round(metrics["JI"], 4),
        "params": sum(p.numel() for p in loaded.detector.parameters()),
        "train_iters": int(loaded.checkpoint["iteration"]),
        "depth": cfg.model.depth,
        "checkpoint": str(work_dir / "best.pt"),
    }


def export_crowd(checkpoint: Path, cfg: TrainJob, out: Path) -> dict[str, Any]:
    """The fp32 ONNX of the PGD student, gated on the whole validation split with the crowd
    metrics (reused when a gated export of the same checkpoint is there); returns its
    scoreboard row (MR^-2, AP, JI through ONNX Runtime)."""
    path = out / "pgd-crowd.onnx"
    manifest = finished_export(path, checkpoint)
    if manifest is None:
        manifest = export_on_val(checkpoint, cfg, out, "pgd-crowd", precision="fp32")
    gate = next(r for r in manifest["gates"]["results"] if r["name"] == "map")
    exported, reference = gate["detail"]["exported"], gate["detail"]["reference"]
    return {
        "name": "pgd-onnx",
        "runtime": "onnxruntime fp32",
        **{k: round(exported[k], 4) for k in ("MR2", "AP", "JI")},
        "torch_MR2_same_images": round(reference["MR2"], 4),
        "gates": manifest["status"],
        "map_gate": gate["value"],
        "checkpoint": str(path),
    }


def format_crowd_scoreboard(rows: Sequence[dict[str, Any]]) -> str:
    """MR^-2 (lower is better), AP and JI per row, in points."""
    header = (
        f"{'model':<9} {'depth':>5} {'MR^-2':>6} {'AP':>6} {'JI':>6} {'params':>8} {'iters':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        depth = f"R{r['depth']}" if "depth" in r else "-"
        params = f"{r['params'] / 1e6:7.1f}M" if "params" in r else f"{'-':>8}"
        lines.append(
            f"{r['name']:<9} {depth:>5} {100 * r['MR2']:6.1f} {100 * r['AP']:6.1f} "
            f"{100 * r['JI']:6.1f} {params} {r.get('train_iters', '-'):>6}"
        )
    return "\n".join(lines)


def run_crowd_quickstart(
    work_dir: str | Path = "runs/demo-crowd",
    *,
    overrides: Sequence[str] = (),
    recipes: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Train (or reuse) the crowd quickstart models, export and gate the PGD student, and write
    the scoreboard."""
    work_dir = Path(work_dir)
    folder = recipes_dir(recipes, first=STAGES[0][1])
    start = time.perf_counter()
    runs, minutes = train_stages(STAGES, folder, work_dir, overrides)
    rows = [crowd_row(name, stage_dir, cfg) for name, stage_dir, cfg in runs]
    cfg = runs[-1][2]
    began = time.perf_counter()
    rows.append(export_crowd(work_dir / "pgd" / "best.pt", cfg, work_dir / "pgd"))
    minutes["export"] = (time.perf_counter() - began) / 60
    write_json(work_dir / "scoreboard.json", rows)
    total = (time.perf_counter() - start) / 60
    print(f"\ncrowd quickstart (synthetic crowd validation split), {total:.1f} min\n")
    print(format_crowd_scoreboard(rows))
    print(
        "MR^-2: log-average miss rate over FPPI 0.01-1 (lower is better); AP and JI as "
        "CrowdHuman's evaluation toolkit computes them (pgd_deploy/crowd_metrics.py)"
    )
    export = rows[-1]
    print(
        f"\npgd-onnx: the pgd student exported to fp32 ONNX and run by ONNX Runtime; its mAP gate "
        f"in MR^-2: {export['map_gate']}; gates {export['gates']}."
    )
    print("\nminutes: " + ", ".join(f"{k} {v:.1f}" for k, v in minutes.items()))
    print(f"measured on: {describe_cpu()}")
    print(f"\nwritten to {work_dir / 'scoreboard.json'}")
    return rows
