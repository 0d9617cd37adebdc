"""`pgd-train demo --crowd`: teacher, student and PGD on the synthetic crowd, scored with MR^-2,
AP and JI, and the PGD student's ONNX gated in MR^-2 (tiny settings: 64 px, 2 iterations)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgd_deploy.cli import train_main

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_the_crowd_quickstart_prints_mr2_ap_and_ji_per_row_and_gates_the_export(tmp_path, capsys):
    work = tmp_path / "demo-crowd"
    tiny = [
        f"data.cache_dir='{tmp_path / 'cache'}'",
        "data.shapes_train=8",
        "data.shapes_val=4",
        "data.shapes_size=64",
        "data.min_size=64",
        "data.max_size=64",
        "model.fpn_channels=64",
        "train.max_iters=2",
        "train.batch_size=2",
        "train.warmup_iters=1",
        "train.device='cpu'",
    ]
    args = ["demo", "--crowd", "--work-dir", str(work), "--recipes", str(ROOT / "train")]
    for item in tiny:
        args += ["--set", item]
    assert train_main(args) == 0
    out = capsys.readouterr().out
    table = out[out.index("model ") :].splitlines()
    assert table[0].split() == ["model", "depth", "MR^-2", "AP", "JI", "params", "iters"]
    assert [line.split()[0] for line in table[2:6]] == ["teacher", "student", "pgd", "pgd-onnx"]
    assert "its mAP gate in MR^-2: MR^-2 " in out
    rows = json.loads((work / "scoreboard.json").read_text())
    assert [r["name"] for r in rows] == ["teacher", "student", "pgd", "pgd-onnx"]
    for row in rows:
        assert 0.0 <= row["MR2"] <= 1.0 and 0.0 <= row["AP"] <= 1.0 and 0.0 <= row["JI"] <= 1.0
    assert [r["depth"] for r in rows[:3]] == [50, 18, 18]
    onnx = rows[-1]
    assert onnx["gates"] == "passed", onnx["map_gate"]  # fp32 ONNX reproduces the student
    assert onnx["MR2"] == pytest.approx(onnx["torch_MR2_same_images"], abs=0.01)
    metrics = json.loads((work / "pgd" / "metrics.json").read_text())
    assert rows[2]["MR2"] == round(metrics["MR2"], 4)
    manifest = json.loads((work / "pgd" / "pgd-crowd.manifest.json").read_text())
    assert manifest["source"]["train_config"]["data"]["metric"] == "crowd"
    # pgd-serve predict --eval scores the ONNX model as it was trained: with the crowd metrics
    from pgd_deploy.cli import serve_main

    val = next((tmp_path / "cache").glob("crowd_*")) / "annotations" / "val.json"
    served = tmp_path / "served"
    predict = ["predict", "--model", str(work / "pgd" / "pgd-crowd.onnx"), "--source", str(val)]
    assert serve_main([*predict, "--out", str(served), "--eval", "--no-progress"]) == 0
    assert json.loads((served / "metrics.json").read_text()) == {
        k: pytest.approx(onnx[k], abs=1e-4) for k in ("MR2", "AP", "JI")
    }  # the export gate's figures for the ONNX model: the same images and evaluator
    assert "CrowdHuman" in capsys.readouterr().out
    # a second run reuses the three finished stages and the gated export
    stamp = (work / "pgd" / "pgd-crowd.onnx").stat().st_mtime_ns
    assert train_main(args) == 0
    assert json.loads((work / "scoreboard.json").read_text()) == rows
    assert (work / "pgd" / "pgd-crowd.onnx").stat().st_mtime_ns == stamp
