"""`pgd-export bench`: one table, ratios against PyTorch eager, the speed-accuracy plot."""

from __future__ import annotations

import json

import pytest

from pgd_deploy.export.bench import BenchRow, parse_targets, torch_precisions
from pgd_deploy.export.bench_report import format_table, plot_speed_accuracy


def torch_precisions_here() -> list[str]:
    """What `--torch-precision auto` must give on this machine."""
    import torch

    if torch.cuda.is_available():
        return ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    return ["fp32"] + (["bf16"] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else [])


def test_torch_precision_choices():
    assert torch_precisions("auto", "auto") == torch_precisions_here()
    assert torch_precisions("fp32, bf16") == ["fp32", "bf16"]
    with pytest.raises(ValueError, match="--torch-precision 'fp8': expected auto or a comma list"):
        torch_precisions("fp8")


def _row(model, runtime, p50, ap=None, batch=1, precision="fp32", target=""):
    return BenchRow(
        model, runtime, precision, 10.0, batch, p50, p50, p50, 1000 / p50, None, ap, "", target
    )


def test_table_has_the_issue_columns_and_ratios():
    from pgd_deploy.export.bench import _fill_ratios

    rows = [
        _row("student", "torch (CPU)", 20.0),
        _row("student", "torch (CPU)", 16.0, precision="bf16"),
        _row("student", "onnxruntime (CPU)", 10.0),
        _row("teacher", "torch (CPU)", 40.0),
        _row("teacher", "onnxruntime (CPU)", 30.0),
        _row("student", "onnxruntime (CPU)", 5.0, precision="int8", target="cpu"),
        _row("teacher", "torch (CPU)", 160.0, batch=8),
        _row("student", "torch compiled (CPU)", 40.0, batch=8),
        _row("student", "torch (CPU)", 80.0, batch=8),
    ]
    rows[7].first_call_s = 93.4
    _fill_ratios(rows)
    # own: the same model's PyTorch fp32 eager (bf16 and compiled rows are not the baseline)
    assert [r.ratio for r in rows] == [1.0, 0.8, 0.5, 1.0, 0.75, 0.25, 1.0, 0.5, 1.0]
    # teacher: the teacher's PyTorch fp32 eager at the same batch
    assert [r.vs_teacher for r in rows] == [0.5, 0.4, 0.25, 1.0, 0.75, 0.125, 1.0, 0.25, 0.5]
    table = format_table(rows).splitlines()
    assert table[0] == (
        "| model | runtime | precision | int8 target | MB | batch | ms (± spread) | ms/img "
        "| p99 ms | img/s | vs own PyTorch fp32 eager | vs teacher PyTorch fp32 eager "
        "| first call s |"
    )
    # batch 1 first; per runtime and precision, teacher and student next to each other
    assert [line.split(" | ")[:3] for line in table[2:]] == [
        ["| student", "torch (CPU)", "fp32"],
        ["| teacher", "torch (CPU)", "fp32"],
        ["| student", "torch (CPU)", "bf16"],
        ["| student", "onnxruntime (CPU)", "fp32"],
        ["| teacher", "onnxruntime (CPU)", "fp32"],
        ["| student", "onnxruntime (CPU)", "int8"],
        ["| student", "torch (CPU)", "fp32"],
        ["| teacher", "torch (CPU)", "fp32"],
        ["| student", "torch compiled (CPU)", "fp32"],
    ]
    assert "| student | onnxruntime (CPU) | int8 | cpu | 10.0 | 1 | 5.00 ±0.00 | 5.00 |" in table[7]
    assert table[-1] == (
        "| student | torch compiled (CPU) | fp32 | - | 10.0 | 8 | 40.00 ±0.00 | 5.00 | 40.00 "
        "| 25.0 | 0.50x | 0.25x | 93.4 |"
    )
    assert not any(" AP |" in line for line in table)


def test_speed_accuracy_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        _row("teacher", "torch (CPU)", 40.0, ap=42.0),
        _row("student", "torch (CPU)", 20.0, 38.0),
        _row("student", "onnxruntime (CPU)", 10.0, ap=37.9),
        _row("student", "onnxruntime (CPU)", 40.0, ap=37.9, batch=8),
    ]
    path = plot_speed_accuracy(rows, tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the points carry numbers, the key beside the plot says what they are: the full labels on
    # the points overlapped (here the three student rows lie within 15 ms and 0.1 AP)
    import matplotlib.pyplot as plt

    from pgd_deploy.export.bench_report import speed_accuracy_figure

    fig = speed_accuracy_figure(rows)
    plot, key = fig.axes
    fig.canvas.draw()
    marks = plot.texts
    assert [t.get_text() for t in marks] == ["1", "2", "3", "4"]
    boxes = [t.get_window_extent() for t in marks]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    (listing,) = key.texts
    assert "3  student: onnxruntime fp32 bs1" in listing.get_text()
    assert "4  student: onnxruntime fp32 bs8" in listing.get_text()
    plt.close(fig)
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
    torch_precisions = torch_precisions_here()
    assert {(r["runtime"].split(" ")[0], r["precision"], r["batch"]) for r in rows} == {
        *(("torch", p, b) for p in torch_precisions for b in (1, 2)),
        ("onnxruntime", "fp32", 1),
        ("onnxruntime", "fp32", 2),
    }
    assert all(r["ratio"] is not None and r["vs_teacher"] is None for r in rows)  # no teacher
    assert all(r["ms_per_image"] == r["ms"] / r["batch"] for r in rows)
    assert all(r["spread"] >= 0 and r["ms"] > 0 for r in rows)
    assert "median over interleaved rounds of each round's fastest call" in out
    assert "vs own PyTorch fp32 eager" in out
    assert "| student | onnxruntime (CPUExecutionProvider) |" in out  # the provider that ran
