"""bench/kd_ablation.py: the three variants really train as named, and the table's statistics."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from _bench_scripts import load_bench

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "kd_ablation.py"


def test_paired_difference_is_a_t_interval_of_the_per_seed_differences() -> None:
    ablation = load_bench("kd_ablation")
    d = ablation.paired_difference([10.0, 12.0, 17.0], [9.0, 9.0, 11.0])  # differences 1, 3, 6
    sd = statistics.stdev([1.0, 3.0, 6.0])
    assert d["mean"] == pytest.approx(10 / 3) and d["n"] == 3
    assert d["hi"] - d["mean"] == pytest.approx(4.303 * sd / 3**0.5)  # t(0.975, 2 df)
    assert d["mean"] - d["lo"] == pytest.approx(d["hi"] - d["mean"])


@pytest.mark.trained
def test_quick_ablation_trains_each_variant_as_named(tmp_path: Path) -> None:
    out = tmp_path / "ablation"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--topk", "3", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        },
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "kd_ablation.json").read_text())
    assert report["table"] in proc.stdout and "pgd - gt_box" in report["table"]
    runs = report["runs"]
    assert sorted((r["variant"], r["seed"]) for r in runs) == sorted(
        (v, s) for v in ("none", "gt_box", "pgd") for s in (0, 1)
    )
    teacher_dir = Path(report["teacher"]["work_dir"])
    for run in runs:
        cfg = tomllib.loads((Path(run["work_dir"]) / "config.toml").read_text())
        assert cfg["train"]["seed"] == run["seed"]
        assert cfg["train"]["max_iters"] == report["settings"]["student_iters"]
        if run["variant"] == "none":
            assert cfg["distill"]["teacher"] == ""
            continue
        assert Path(cfg["distill"]["teacher"]) == teacher_dir / "best.pt"
        assert cfg["distill"]["masks"] == run["variant"]  # gt_box or pgd, nothing else
        assert cfg["distill"]["init_student"] is False  # only the KD losses may transfer
        assert cfg["distill"]["topk"] == (3 if run["variant"] == "pgd" else 30)
    # The table's numbers are those of the runs.
    pgd = [r["AP"] for r in sorted(runs, key=lambda r: r["seed"]) if r["variant"] == "pgd"]
    none = [r["AP"] for r in sorted(runs, key=lambda r: r["seed"]) if r["variant"] == "none"]
    assert report["summary"]["pgd"]["AP"]["mean"] == pytest.approx(statistics.fmean(pgd))
    diff = report["differences"]["pgd - none"]["AP"]["mean"]
    assert diff == pytest.approx(statistics.fmean(pgd) - statistics.fmean(none))
