"""`pgd-export bench`: one table, ratios against PyTorch eager, the speed-accuracy plot."""

from __future__ import annotations

import json

import pytest

from pgd_deploy.export.bench import BenchRow, format_table, parse_targets, plot_speed_accuracy


def _row(model, runtime, p50, ap=None, batch=1, precision="fp32", target=""):
    return BenchRow(
        model, runtime, precision, 10.0, batch, p50, p50, p50, 1000 / p50, None, ap, "", target
    )


def test_table_has_the_issue_columns_and_ratios():
    from pgd_deploy.export.bench import _fill_ratios

    rows = [
        _row("student", "torch (CPU)", 20.0),
        _row("student", "onnxruntime (CPU)", 10.0),
        _row("teacher", "torch (CPU)", 40.0),
        _row("teacher", "onnxruntime (CPU)", 30.0),
        _row("student", "onnxruntime (CPU)", 5.0, precision="int8", target="cpu"),
    ]
    _fill_ratios(rows)
    assert [r.ratio for r in rows] == [1.0, 0.5, 1.0, 0.75, 0.25]
    table = format_table(rows)
    assert table.splitlines()[0].startswith(
        "| model | runtime | precision | int8 target | MB | batch | p50 ms | p99 ms | img/s | ratio"
    )
    assert "| student | onnxruntime (CPU) | fp32 | - | 10.0 | 1 | 10.00 |" in table
    assert "| student | onnxruntime (CPU) | int8 | cpu | 10.0 | 1 | 5.00 |" in table
    assert "0.50x" in table and " AP |" not in table


def test_speed_accuracy_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        _row("teacher", "torch (CPU)", 40.0, ap=42.0),
        _row("student", "torch (CPU)", 20.0, 38.0),
        _row("student", "onnxruntime (CPU)", 10.0, ap=37.9),
    ]
    path = plot_speed_accuracy(rows, tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="--val"):
        plot_speed_accuracy([_row("s", "torch", 1.0)], tmp_path / "none.png")


def test_parse_targets(tmp_path):
    f = tmp_path / "s.onnx"
    f.write_bytes(b"x")
    assert [(t.label, t.path.name) for t in parse_targets([str(f), f"student={f}"])] == [
        ("s", "s.onnx"),
        ("student", "s.onnx"),
    ]
    with pytest.raises(ValueError, match="file not found"):
        parse_targets([str(tmp_path / "missing.onnx")])


def test_bench_command_measures_artifact_and_its_pytorch_source(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from _export_fixtures import make_checkpoint

    from pgd_deploy.export.command import main
    from pgd_deploy.export.to_onnx import export_checkpoint_onnx

    ckpt = make_checkpoint(tmp_path / "student.pt")
    onnx_path = export_checkpoint_onnx(
        ckpt, tmp_path / "student.onnx", imgsz=(64, 64), simplify=False
    )
    rc = main(
        [
            "bench",
            "--artifact",
            f"student={onnx_path}",
            "--batch",
            "1,2",
            "--warmup",
            "1",
            "--iters",
            "2",
            "--min-seconds",
            "0",
            "--json",
            str(tmp_path / "rows.json"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {(r["runtime"].split(" ")[0], r["batch"]) for r in rows} == {
        ("torch", 1),
        ("torch", 2),
        ("onnxruntime", 1),
        ("onnxruntime", 2),
    }
    assert all(r["ratio"] is not None for r in rows)
    assert "ratio to PyTorch eager" in out
    assert "| student | onnxruntime (CPUExecutionProvider) |" in out  # the provider that ran
