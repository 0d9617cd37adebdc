"""One latency methodology for the benchmark, the batch CLI and the web demo.

Warm-up runs first, then timed runs; each stage (pre / infer / post) is timed separately with
`time.perf_counter`, and a `sync` callable (e.g. `torch.cuda.synchronize`) is called before each
clock read so asynchronous GPU work is counted where it happens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np


@dataclass
class LatencyStats:
    """Latency statistics in milliseconds over `n` timed runs."""

    n: int
    mean: float
    std: float
    p50: float
    p90: float
    p99: float
    min: float

    @classmethod
    def from_samples(cls, seconds: list[float] | np.ndarray) -> LatencyStats:
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        if ms.size == 0:
            return cls(0, *([float("nan")] * 6))
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(
            int(ms.size),
            float(ms.mean()),
            float(ms.std()),
            float(p50),
            float(p90),
            float(p99),
            float(ms.min()),
        )


def measure(
    fn: Callable[[], object],
    *,
    warmup: int = 3,
    iters: int = 20,
    min_seconds: float = 0.0,
    sync: Callable[[], None] | None = None,
) -> LatencyStats:
    """Time `fn()` after `warmup` calls: at least `iters` runs and at least `min_seconds`."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < iters or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append(time.perf_counter() - t0)
    return LatencyStats.from_samples(samples)


@dataclass
class StageTimer:
    """Accumulates per-stage wall time: `with timer.stage("infer"): ...`."""

    sync: Callable[[], None] | None = None
    totals: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        if self.sync:
            self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                self.sync()
            dt = time.perf_counter() - t0
            self.last[name] = dt
            self.totals[name] = self.totals.get(name, 0.0) + dt

    def per_image_ms(self, images: int) -> dict[str, float]:
        """Total milliseconds per image of each stage."""
        return {k: 1000.0 * v / max(images, 1) for k, v in self.totals.items()}
