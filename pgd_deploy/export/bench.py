"""Latency benchmark: teacher and student side by side on every backend and precision, and the
speed-accuracy plot.

One run measures every artifact given and, for each checkpoint (given, or the source recorded in
an export's manifest), PyTorch at every requested precision (fp32 eager, bf16/fp16 autocast,
optionally compiled) on the same input size. Two ratios, both of the robust latency at the same
batch: "vs own eager" against the same model's PyTorch fp32 eager (what the runtime buys), and
"vs teacher" against the teacher's PyTorch fp32 eager (what distillation plus the runtime buy;
the model labelled "teacher"). Timing follows `runtime.timing.interleave`: the runtimes take
turns round by round, and each row's latency is the median of its per-round fastest calls, with
their interquartile range as spread, so that a burst of load moves neither the figures nor the
ratios; `OtherLoad` records how busy the machine was, and `BenchResult.warnings` says when the
figures cannot be trusted. The first call of each (where torch.compile compiles) is timed alone.
Only the network call is timed; pre/post-processing is the same numpy code for every runtime.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pgd_deploy.progress import Progress
from pgd_deploy.runtime.backends import Backend, load_backend
from pgd_deploy.runtime.manifest import read_manifest
from pgd_deploy.runtime.timing import OtherLoad, RobustLatency, interleave, latency_warnings
from pgd_deploy.runtime.torch_backend import TorchBackend

logger = logging.getLogger(__name__)


@dataclass
class BenchRow:
    """One (model, runtime, batch) measurement; latencies in ms per batch (`ms`: the robust
    figure, median of per-round minimums; `spread`: their interquartile range; p50/p90/p99: the
    distribution of every timed call)."""

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
    vs_teacher: float | None = None  # p50 / the teacher's PyTorch fp32 eager p50, same batch
    first_call_s: float | None = None  # the first call alone (torch.compile compiles in it)
    ms: float | None = None  # the robust latency (`runtime.timing.RobustLatency`); None: p50
    spread: float = 0.0
    group: str = ""  # the label its ratios are computed within ("" = `model`)

    @property
    def latency(self) -> float:
        """The figure the table, the ratios and the plot use: `ms` (else p50)."""
        return self.ms if self.ms is not None else self.p50

    @property
    def ms_per_image(self) -> float:
        return self.latency / self.batch


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


def torch_precisions(spec: str, device: str = "auto") -> list[str]:
    """`--torch-precision`: "auto" = every precision this device runs (CUDA: fp32, fp16, bf16
    where supported; CPU: fp32, and bf16 when oneDNN has bf16 kernels), else a comma list."""
    import torch

    from pgd_deploy.runtime.torch_backend import TORCH_PRECISIONS

    if spec != "auto":
        chosen = [p.strip() for p in spec.split(",") if p.strip()]
        bad = [p for p in chosen if p not in TORCH_PRECISIONS]
        if bad or not chosen:
            raise ValueError(
                f"--torch-precision {spec!r}: expected auto or a comma list of "
                f"{', '.join(TORCH_PRECISIONS)}"
            )
        return chosen

    if device.startswith(("cuda", "tensorrt")) or (device == "auto" and torch.cuda.is_available()):
        return ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    return ["fp32"] + (["bf16"] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else [])


def _torch_variants(
    source: str,
    size: Sequence[int],
    device: str,
    precisions: Sequence[str],
    compile: bool,
    compile_mode: str,
) -> list[TorchBackend]:
    """The checkpoint at each precision, eager then (with `compile`) compiled."""
    out = []
    torch_device = "auto" if device.startswith("tensorrt") else device
    for compiled in (False, True) if compile else (False,):
        for precision in precisions:
            try:
                out.append(
                    TorchBackend(
                        source,
                        device=torch_device,
                        input_size=size,
                        precision=precision,
                        compile=compiled,
                        compile_mode=compile_mode,
                    )
                )
            except ValueError as err:  # e.g. fp16 on a CPU: a row this machine cannot have
                logger.warning("skipped: %s", err)
    return out


def _backends(
    targets: Sequence[Target],
    imgsz: Sequence[int] | None,
    threads: int,
    device: str = "auto",
    precisions: Sequence[str] = ("fp32",),
    compile: bool = False,
    compile_mode: str = "default",
) -> list[tuple[str, Backend, float, str, str]]:
    """(label, backend, size MB, path, group) for every target plus PyTorch at each precision
    for each source checkpoint. The PyTorch rows of an fp16/int8 artifact's source are labelled
    "<label> (source checkpoint)": they run the checkpoint, not the artifact the label names;
    their `group` stays the artifact's label (the ratios)."""
    out: list[tuple[str, Backend, float, str, str]] = []
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
            size = size or (backend.input_size if backend is not None else None)
            shown = t.label
            if backend is not None and meta.get("precision", "fp32") != "fp32":
                shown = f"{t.label} (source checkpoint)"
            for torch_backend in _torch_variants(
                source, size, device, precisions, compile, compile_mode
            ):
                out.append((shown, torch_backend, _weights_mb(torch_backend), source, t.label))
            eager_done.add((t.label, source))
        if backend is not None:
            out.append((t.label, backend, t.path.stat().st_size / 1e6, str(t.path), t.label))
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
    precisions: Sequence[str] = ("fp32",),
    compile: bool = False,
    compile_mode: str = "default",
    warnings: list[str] | None = None,
) -> list[BenchRow]:
    """Measure every target (and its PyTorch source at each precision) at each batch size.

    Args:
        targets: artifacts and/or checkpoints (see `parse_targets`).
        batches: batch sizes to time.
        imgsz: (H, W) for checkpoints without a manifest (default: each artifact's manifest).
        warmup, iters, min_seconds: the timing protocol (`runtime.timing.measure`).
        threads: ONNX Runtime intra-op threads (0 = its default, one per physical core).
        val_images: an `ImageSet` with annotations: adds COCO AP per model.
        device: ONNX Runtime providers (auto, cpu, cuda[:N], tensorrt[:N]; the table's runtime
            column names the provider actually used) and the GPU of plans and checkpoints.
        precisions: PyTorch precisions of each checkpoint (`torch_precisions`); ones this
            device cannot run are skipped with a warning.
        compile, compile_mode: also time each checkpoint precision under torch.compile.
        warnings: filled with why the figures may not hold (`runtime.timing.latency_warnings`:
            a busy machine, two rows of one network and runtime further apart than their
            spreads).
    """
    loaded = _backends(targets, imgsz, threads, device, precisions, compile, compile_mode)
    aps = [
        _evaluate(b, val_images, f"{label} {b.describe()}") if val_images is not None else None
        for label, b, _, _, _ in loaded
    ]
    rows: list[BenchRow] = []
    for batch in batches:
        runnable = [i for i, (_, b, _, _, _) in enumerate(loaded) if batch <= b.max_batch]
        for i in set(range(len(loaded))) - set(runnable):
            logger.warning("%s: batch %d exceeds its profile, skipped", loaded[i][3], batch)
        calls = [_call(loaded[i][1], batch) for i in runnable]
        firsts = [_first_call(call) for call in calls]
        _, rounds = _rounds(iters)
        desc = f"timing {len(calls)} runtimes at batch {batch}, interleaved"
        with OtherLoad() as load, Progress(rounds, desc, unit="round") as bar:
            stats = _interleaved(
                calls, warmup=warmup, iters=iters, min_seconds=min_seconds, progress=bar.update
            )
        if warnings is not None:
            warnings += latency_warnings([], load)
        for i, st, first in zip(runnable, stats, firsts):
            label, backend, size_mb, path, group = loaded[i]
            runtime = backend.name + _variant_note(backend) + _provider_note(backend)
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
                    first_call_s=first,
                    ms=st.ms,
                    spread=st.spread,
                    group=group,
                )
            )
    _fill_ratios(rows)
    if warnings is not None:
        warnings += latency_warnings(
            [
                (
                    f"{r.model} ({r.runtime} {r.precision} bs{r.batch})",
                    _same_network(r),
                    r.ms,
                    r.spread,
                )
                for r in rows
                if r.ms is not None
            ]
        )
    return rows


def _same_network(row: BenchRow) -> tuple[str, str, str, int, float]:
    """Rows with this key run one architecture the same way (same runtime, precision, batch and
    weight size, e.g. a student and its PGD twin): their latencies should agree within their
    spreads."""
    return (row.runtime, row.precision, row.int8_target, row.batch, row.size_mb)


def _first_call(call: Any) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def _variant_note(backend: Backend) -> str:
    """ " compiled" / " channels-last" for PyTorch variants, else ""."""
    notes = []
    if getattr(backend, "compiled", False):
        mode = getattr(backend, "compile_mode", "default")
        notes.append("compiled" + ("" if mode == "default" else f" {mode}"))
    if getattr(backend, "channels_last", False):
        notes.append("channels-last")
    return "".join(f" {n}" for n in notes)


def _call(backend: Backend, batch: int) -> Any:
    x = _example_batch(backend, batch)

    def run() -> None:
        backend.infer(x)
        backend.sync()

    return run


def _rounds(iters: int, block: int = 5) -> tuple[int, int]:
    """(timed calls per round, rounds) for at least `iters` timed calls in rounds of `block`."""
    block = max(1, min(block, iters)) if iters else block
    return block, max(1, -(-iters // block))


def _interleaved(
    calls: Sequence[Any],
    *,
    warmup: int,
    iters: int,
    min_seconds: float,
    block: int = 5,
    progress: Any = None,
) -> list[RobustLatency]:
    """`runtime.timing.interleave` with rounds of `block` timed calls: at least `iters` timed
    calls each and `min_seconds` in total (`progress(1)` after each round)."""
    block, rounds = _rounds(iters, block)
    step = (lambda _: progress(1)) if progress is not None else None
    return interleave(
        calls,
        rounds=rounds,
        per_round=block,
        warmup=warmup,
        min_seconds=min_seconds,
        progress=step,
    )


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


def is_fp32_eager(row: BenchRow) -> bool:
    """PyTorch fp32, not compiled, default layout: the baseline of both ratios."""
    return row.runtime.startswith("torch (") and row.precision == "fp32"


def _fill_ratios(rows: list[BenchRow], teacher: str = "teacher") -> None:
    eager = {(r.group or r.model, r.batch): r.latency for r in rows if is_fp32_eager(r)}
    for r in rows:
        base = eager.get((r.group or r.model, r.batch))
        r.ratio = r.latency / base if base else None
        base = eager.get((teacher, r.batch))
        r.vs_teacher = r.latency / base if base else None


def _evaluate(backend: Backend, images: Any, what: str = "") -> float:
    from pgd_deploy.metrics import detections_to_coco, evaluate_coco

    results = []
    ids = iter(images.image_ids)
    batches = images.batches(backend.input_size, min(8, backend.max_batch))
    with Progress(len(images), f"AP of {what or backend.describe()}", unit="img") as bar:
        for batch, transforms in batches:
            for det in backend.postprocess(backend.infer(batch), transforms):
                results += detections_to_coco(next(ids), det, backend.category_ids)
            bar.update(len(transforms))
    return 100.0 * evaluate_coco(images.annotations, results, image_ids=images.image_ids)["AP"]
