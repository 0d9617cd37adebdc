"""Reporting a benchmark (`export.bench`): the machine line, the markdown table, JSON rows and
the AP-against-latency plot."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pgd_deploy.export.bench import BenchRow
from pgd_deploy.io_utils import atomic_open


def environment_line() -> str:
    """CPU/GPU and library versions to print next to the numbers."""
    from pgd_deploy.export.manifest import software_versions

    v = software_versions()
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            first = fh.read().split("\n\n")[0].splitlines()  # the first logical CPU
        info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first)}
        cpu = info.get("model name", cpu)
        flags = set(info.get("flags", "").split())
    except OSError:
        pass
    isa = [f for f in ("avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags]
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f"; GPU {torch.cuda.get_device_name()}"
    except ImportError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs"
        + (f" ({', '.join(isa)})" if isa else "")
        + f"{gpu}; torch {v.get('torch')}, onnxruntime {v.get('onnxruntime')}"
    )


def format_table(rows: Sequence[BenchRow]) -> str:
    """The benchmark as one markdown table: rows grouped by batch, then runtime and precision,
    teacher and student next to each other; a "first call s" column when something compiled."""
    show_ap = any(r.ap is not None for r in rows)
    show_first = any("compiled" in r.runtime for r in rows)
    head = (
        "| model | runtime | precision | int8 target | MB | batch | ms (± spread) | ms/img "
        "| p99 ms | img/s | vs own PyTorch fp32 eager | vs teacher PyTorch fp32 eager |"
    )
    sep = "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if show_first:
        head, sep = head + " first call s |", sep + "---:|"
    if show_ap:
        head, sep = head + " AP |", sep + "---:|"
    lines = [head, sep]

    def x(v: float | None) -> str:
        return f"{v:.2f}x" if v is not None else "-"

    order = list(dict.fromkeys((r.runtime, r.precision, r.int8_target) for r in rows))
    models = list(dict.fromkeys(r.model for r in rows))
    for r in sorted(
        rows,
        key=lambda r: (
            r.batch,
            order.index((r.runtime, r.precision, r.int8_target)),
            models.index(r.model),
        ),
    ):
        line = (
            f"| {r.model} | {r.runtime} | {r.precision} | {r.int8_target or '-'} | "
            f"{r.size_mb:.1f} | {r.batch} | {r.latency:.2f} ±{r.spread:.2f} | "
            f"{r.ms_per_image:.2f} | {r.p99:.2f} | "
            f"{r.img_s:.1f} | {x(r.ratio)} | {x(r.vs_teacher)} |"
        )
        if show_first:
            first = r.first_call_s if "compiled" in r.runtime else None
            line += f" {first:.1f} |" if first is not None else " - |"
        if show_ap:
            line += f" {r.ap:.1f} |" if r.ap is not None else " - |"
        lines.append(line)
    return "\n".join(lines)


LATENCY_NOTE = (
    "ms: per batch, the median over interleaved rounds of each round's fastest call, ± the "
    "interquartile range of those minimums; p99 over every timed call; ratios of the ms column"
)


def rows_to_json(rows: Sequence[BenchRow]) -> list[dict[str, Any]]:
    return [{**asdict(r), "ms_per_image": r.ms_per_image} for r in rows]


def point_label(row: BenchRow) -> str:
    """What a point of the speed-accuracy plot is: runtime, precision, int8 target, batch."""
    variant = row.runtime.split(" (")[0]
    target = f" {row.int8_target}" if row.int8_target else ""
    return f"{variant} {row.precision}{target} bs{row.batch}"


def plot_speed_accuracy(
    rows: Sequence[BenchRow], path: str | Path, *, batch: int | None = None
) -> Path:
    """AP against ms/image for every row (every batch, or only `batch`): a PNG via matplotlib
    (`speed_accuracy_figure`).

    Raises:
        ValueError: no row has an AP (run the benchmark with --val).
    """
    import matplotlib.pyplot as plt

    fig = speed_accuracy_figure(rows, batch=batch)
    path = Path(path)
    try:
        with atomic_open(path) as fh:
            fig.savefig(fh, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def speed_accuracy_figure(rows: Sequence[BenchRow], *, batch: int | None = None) -> Any:
    """The speed-accuracy figure: numbered points, and the key to the numbers beside the plot.

    Raises:
        ValueError: no row has an AP (run the benchmark with --val).
    """
    points = [r for r in rows if r.ap is not None and batch in (None, r.batch)]
    if not points:
        raise ValueError("speed-accuracy plot: no AP values; run the benchmark with --val")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, key) = plt.subplots(
        1, 2, figsize=(11, 4.5), dpi=120, gridspec_kw={"width_ratios": [3, 2]}
    )
    # Each point carries a number; the key beside the plot says what it is. Full labels on the
    # points overlapped as soon as two runtimes had similar speed and AP.
    lines = []
    for model in dict.fromkeys(r.model for r in points):
        mine = [r for r in points if r.model == model]
        xs = [r.ms_per_image for r in mine]
        dots = ax.scatter(xs, [r.ap for r in mine], label=model, s=40)
        for r, x in zip(mine, xs):
            lines.append((f"{len(lines) + 1}", f"{model}: {point_label(r)}"))
            ax.annotate(
                lines[-1][0],
                (x, r.ap),
                fontsize=7,
                color=dots.get_facecolor()[0],
                xytext=(3, 3),
                textcoords="offset points",
            )
    where = "every batch" if batch is None else f"batch {batch}"
    ax.set_xlabel(f"latency, ms / image ({where}; median of per-round minimums)")
    ax.set_ylabel("COCO AP")
    ax.set_title("Speed vs accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    key.axis("off")
    key.text(
        0.0,
        1.0,
        "\n".join(f"{n:>3}  {text}" for n, text in lines),
        fontsize=7,
        family="monospace",
        va="top",
        transform=key.transAxes,
    )
    fig.tight_layout()
    return fig
