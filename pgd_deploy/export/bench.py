"""Latency benchmark of exported artifacts next to PyTorch eager, and the speed-accuracy plot.

One run measures every artifact given (teacher and student side by side) and, for each exported
artifact whose source checkpoint is present, PyTorch eager on the same input size, so the
"ratio" column (p50 latency / PyTorch eager p50, same model and batch) compares like with like.
Timing follows `runtime.timing` (warm-up, then timed runs with a device sync, percentiles), with
the runtimes interleaved round by round so that a busy machine slows them all alike. Only the
network call is timed; pre/post-processing is the same numpy code for every runtime.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pgd_deploy.runtime.backends import Backend, TorchBackend, load_backend
from pgd_deploy.runtime.manifest import read_manifest
from pgd_deploy.runtime.timing import LatencyStats, measure

logger = logging.getLogger(__name__)


@dataclass
class BenchRow:
    """One (model, runtime, batch) measurement; latencies in ms per batch."""

    model: str
    runtime: str
    precision: str
    size_mb: float
    batch: int
    p50: float
    p90: float
    p99: float
    img_s: float
    ratio: float | None = None  # p50 / PyTorch eager p50 of the same model and batch
    ap: float | None = None  # COCO AP (points) on --val, when given
    path: str = ""
    int8_target: str = ""  # "cpu" / "tensorrt" for int8 artifacts (their manifest), else ""


@dataclass(frozen=True)
class Target:
    label: str
    path: Path


def parse_targets(specs: Sequence[str]) -> list[Target]:
    """`PATH` or `LABEL=PATH` -> targets (label defaults to the file stem).

    Raises:
        ValueError: a missing file (the message names it).
    """
    targets = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = Path(spec).stem, spec
        if not Path(path).is_file():
            raise ValueError(f"--artifact {spec}: file not found")
        targets.append(Target(label, Path(path)))
    return targets


def _weights_mb(backend: TorchBackend) -> float:
    tensors = backend.model.state_dict().values()
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6


def _backends(
    targets: Sequence[Target], imgsz: Sequence[int] | None, threads: int, device: str = "auto"
) -> list[tuple[str, Backend, float, str]]:
    """(label, backend, size MB, path) for every target plus the PyTorch eager of each source."""
    out: list[tuple[str, Backend, float, str]] = []
    eager_done: set[tuple[str, str]] = set()
    for t in targets:
        meta = read_manifest(t.path) or {}
        size = imgsz or meta.get("imgsz")
        source = meta.get("source", {}).get("checkpoint")
        if t.path.suffix in (".pt", ".pth"):
            source, backend = str(t.path), None
        elif t.path.suffix == ".onnx":
            from pgd_deploy.runtime.backends import OrtBackend

            backend = OrtBackend(t.path, device=device, threads=threads)
        else:
            backend = load_backend(t.path, device=device)
        if source and Path(source).is_file() and (t.label, source) not in eager_done:
            eager = TorchBackend(source, input_size=size or backend.input_size)
            out.append((t.label, eager, _weights_mb(eager), source))
            eager_done.add((t.label, source))
        if backend is not None:
            out.append((t.label, backend, t.path.stat().st_size / 1e6, str(t.path)))
    return out


def _example_batch(backend: Backend, batch: int) -> np.ndarray:
    from pgd_deploy.data.shapes import ShapesSpec, render_image

    image = np.asarray(render_image(0, "val", 0, ShapesSpec(size=256))[0].convert("RGB"))
    x, _ = backend.preprocess([image] * batch)
    return x


def run_bench(
    targets: Sequence[Target],
    *,
    batches: Sequence[int] = (1,),
    imgsz: Sequence[int] | None = None,
    warmup: int = 10,
    iters: int = 50,
    min_seconds: float = 2.0,
    threads: int = 0,
    val_images: Any = None,
    device: str = "auto",
) -> list[BenchRow]:
    """Measure every target (and its PyTorch eager source) at each batch size.

    Args:
        targets: artifacts and/or checkpoints (see `parse_targets`).
        batches: batch sizes to time.
        imgsz: (H, W) for checkpoints without a manifest (default: each artifact's manifest).
        warmup, iters, min_seconds: the timing protocol (`runtime.timing.measure`).
        threads: ONNX Runtime intra-op threads (0 = its default, one per physical core).
        val_images: an `ImageSet` with annotations: adds COCO AP per model.
        device: ONNX Runtime providers (auto, cpu, cuda[:N], tensorrt[:N]; the table's runtime
            column names the provider actually used) and the GPU of plans and checkpoints.
    """
    loaded = _backends(targets, imgsz, threads, device)
    aps = [_evaluate(b, val_images) if val_images is not None else None for _, b, _, _ in loaded]
    rows: list[BenchRow] = []
    for batch in batches:
        runnable = [i for i, (_, b, _, path) in enumerate(loaded) if batch <= b.max_batch]
        for i in set(range(len(loaded))) - set(runnable):
            logger.warning("%s: batch %d exceeds its profile, skipped", loaded[i][3], batch)
        calls = [_call(loaded[i][1], batch) for i in runnable]
        stats = _interleaved(calls, warmup=warmup, iters=iters, min_seconds=min_seconds)
        for i, st in zip(runnable, stats):
            label, backend, size_mb, path = loaded[i]
            runtime = backend.name + _provider_note(backend)
            rows.append(
                BenchRow(
                    label,
                    runtime,
                    backend.precision,
                    round(size_mb, 1),
                    batch,
                    st.p50,
                    st.p90,
                    st.p99,
                    1000.0 * batch / st.mean,
                    None,
                    aps[i],
                    path,
                    str(backend.meta.get("int8_target") or ""),
                )
            )
    _fill_ratios(rows)
    return rows


def _call(backend: Backend, batch: int) -> Any:
    x = _example_batch(backend, batch)

    def run() -> None:
        backend.infer(x)
        backend.sync()

    return run


def _interleaved(
    calls: Sequence[Any], *, warmup: int, iters: int, min_seconds: float, block: int = 5
) -> list[LatencyStats]:
    """Time the calls in round-robin blocks so that load changes on a shared machine hit every
    runtime alike. Each block starts with one untimed call: thread pools that spin after their
    last call (ONNX Runtime, OpenMP) would otherwise slow the next runtime's first call.
    At least `iters` timed calls each and `min_seconds` in total."""
    for call in calls:
        measure(call, warmup=warmup, iters=0)
    block = max(1, min(block, iters))
    samples: list[list[float]] = [[] for _ in calls]
    start = time.perf_counter()
    while len(samples[0]) < iters or time.perf_counter() - start < min_seconds:
        for call, bucket in zip(calls, samples):
            call()
            for _ in range(block):
                t0 = time.perf_counter()
                call()
                bucket.append(time.perf_counter() - t0)
    return [LatencyStats.from_samples(s) for s in samples]


def _provider_note(backend: Backend) -> str:
    """Where the runtime ran: the ONNX Runtime provider actually used, the torch device, the
    GPU of a TensorRT plan."""
    provider = getattr(backend, "provider", None)
    if provider:
        return f" ({provider})"
    device = getattr(backend, "device", None)
    if device is not None and hasattr(device, "type"):
        return f" ({device.type.upper()})"
    gpu = getattr(backend, "gpu", None)
    return f" ({gpu})" if gpu else ""


def _fill_ratios(rows: list[BenchRow]) -> None:
    eager = {(r.model, r.batch): r.p50 for r in rows if r.runtime.startswith("torch")}
    for r in rows:
        base = eager.get((r.model, r.batch))
        r.ratio = r.p50 / base if base else None


def _evaluate(backend: Backend, images: Any) -> float:
    from pgd_deploy.metrics import detections_to_coco, evaluate_coco

    results = []
    ids = iter(images.image_ids)
    for batch, transforms in images.batches(backend.input_size, min(8, backend.max_batch)):
        for det in backend.postprocess(backend.infer(batch), transforms):
            results += detections_to_coco(next(ids), det, backend.category_ids)
    return 100.0 * evaluate_coco(images.annotations, results, image_ids=images.image_ids)["AP"]


def environment_line() -> str:
    """CPU/GPU and library versions to print next to the numbers."""
    from pgd_deploy.export.manifest import software_versions

    v = software_versions()
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs; "
        f"torch {v.get('torch')}, onnxruntime {v.get('onnxruntime')}"
    )


def format_table(rows: Sequence[BenchRow]) -> str:
    """The benchmark as one markdown table."""
    show_ap = any(r.ap is not None for r in rows)
    head = (
        "| model | runtime | precision | int8 target | MB | batch | p50 ms | p99 ms | img/s "
        "| ratio to PyTorch eager |"
    )
    sep = "|---|---|---|---|---:|---:|---:|---:|---:|---:|"
    if show_ap:
        head, sep = head + " AP |", sep + "---:|"
    lines = [head, sep]
    for r in rows:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        line = (
            f"| {r.model} | {r.runtime} | {r.precision} | {r.int8_target or '-'} | "
            f"{r.size_mb:.1f} | {r.batch} | "
            f"{r.p50:.2f} | {r.p99:.2f} | {r.img_s:.1f} | {ratio} |"
        )
        if show_ap:
            line += f" {r.ap:.1f} |" if r.ap is not None else " - |"
        lines.append(line)
    return "\n".join(lines)


def rows_to_json(rows: Sequence[BenchRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def plot_speed_accuracy(rows: Sequence[BenchRow], path: str | Path, *, batch: int = 1) -> Path:
    """AP against ms/image (batch `batch`) for every model and runtime: a PNG via matplotlib.

    Raises:
        ValueError: no row has an AP (run the benchmark with --val).
    """
    points = [r for r in rows if r.ap is not None and r.batch == batch]
    if not points:
        raise ValueError("speed-accuracy plot: no AP values; run the benchmark with --val")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for model in dict.fromkeys(r.model for r in points):
        mine = [r for r in points if r.model == model]
        xs = [r.p50 / r.batch for r in mine]
        ax.scatter(xs, [r.ap for r in mine], label=model, s=40)
        for r, x in zip(mine, xs):
            ax.annotate(
                f"{r.runtime.split(' ')[0]} {r.precision}",
                (x, r.ap),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )
    ax.set_xlabel(f"latency p50, ms / image (batch {batch})")
    ax.set_ylabel("COCO AP")
    ax.set_title("Speed vs accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
