"""One latency methodology for the benchmark, the batch CLI and the web demo.

Warm-up runs first, then timed runs; each stage (pre / infer / post) is timed separately with
`time.perf_counter`, and a `sync` callable (e.g. `torch.cuda.synchronize`) is called before each
clock read so asynchronous GPU work is counted where it happens.

Comparisons (`interleave`: the scoreboard, `pgd-export bench`) time several models round by
round, a few calls each per round, and report the median over rounds of each round's fastest
call, with the interquartile range of those minimums as its spread: a burst of load slows some
rounds, not the figure. `OtherLoad` measures how much CPU other processes took meanwhile, and
`latency_warnings` says when the figures cannot be trusted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
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


@dataclass
class RobustLatency:
    """One model's latency from `interleave`, in milliseconds.

    Attributes:
        ms: the median over rounds of each round's fastest call.
        spread: the interquartile range of those per-round minimums.
        rounds: the per-round minimums.
        stats: every timed call (p50, p90, p99 of the whole distribution).
    """

    ms: float
    spread: float
    rounds: list[float]
    stats: LatencyStats

    @property
    def p50(self) -> float:
        return self.stats.p50

    @property
    def p90(self) -> float:
        return self.stats.p90

    @property
    def p99(self) -> float:
        return self.stats.p99

    @property
    def mean(self) -> float:
        return self.stats.mean

    @classmethod
    def from_rounds(cls, rounds: Sequence[Sequence[float]]) -> RobustLatency:
        """From the timed calls (seconds) of each round."""
        minimums = np.array([1000.0 * min(r) for r in rounds if len(r)], dtype=np.float64)
        everything = [t for r in rounds for t in r]
        if minimums.size == 0:
            return cls(float("nan"), float("nan"), [], LatencyStats.from_samples(everything))
        q25, q50, q75 = np.percentile(minimums, [25, 50, 75])
        return cls(
            float(q50), float(q75 - q25), minimums.tolist(), LatencyStats.from_samples(everything)
        )


def interleave(
    calls: Sequence[Callable[[], object]],
    *,
    rounds: int = 8,
    per_round: int = 5,
    warmup: int = 3,
    min_seconds: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> list[RobustLatency]:
    """Time `calls` round-robin: each round runs every call once untimed (thread pools that spin
    after their last call would slow the next one's first call), then `per_round` timed calls.
    At least `rounds` rounds and `min_seconds` in total. `progress(i)` is called after round i.
    """
    for call in calls:
        measure(call, warmup=warmup, iters=0)
    samples: list[list[list[float]]] = [[] for _ in calls]
    start = time.perf_counter()
    done = 0
    while done < rounds or time.perf_counter() - start < min_seconds:
        for call, bucket in zip(calls, samples):
            call()
            times = []
            for _ in range(max(1, per_round)):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            bucket.append(times)
        done += 1
        if progress is not None:
            progress(done)
    return [RobustLatency.from_rounds(s) for s in samples]


def _cpu_busy_seconds() -> float | None:
    """Seconds of CPU time spent not idle by the whole machine (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal (guest time is already in user); steal,
    # time the hypervisor gave to other machines, counts as taken from this benchmark
    ticks = [int(v) for v in fields[1:9]]
    idle = sum(ticks[3:5])
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass
class OtherLoad:
    """How busy the machine was with other work while a block ran:
    `with OtherLoad() as load: ...; load.cores`.

    Attributes:
        cores: CPU cores other processes (and the hypervisor) kept busy on average during the
            block (None where /proc/stat is missing); this process's own threads excluded.
        loadavg: the 1-minute load average when the block started (None where unknown).
        cpus: logical CPUs of the machine.
    """

    cores: float | None = None
    loadavg: float | None = None
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)

    BUSY_CORES = 0.25  # other work above a quarter core skews a CPU benchmark

    def __enter__(self) -> OtherLoad:
        self._wall = time.perf_counter()
        self._busy = _cpu_busy_seconds()
        times = os.times()
        self._mine = times.user + times.system
        try:
            self.loadavg = os.getloadavg()[0]
        except OSError:
            self.loadavg = None
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._wall
        busy = _cpu_busy_seconds()
        times = os.times()
        mine = times.user + times.system - self._mine
        if busy is not None and self._busy is not None and wall > 0:
            self.cores = max(0.0, (busy - self._busy - mine) / wall)

    @property
    def busy(self) -> bool:
        """Other work took more than `BUSY_CORES` on average, or the load average exceeded the
        CPU count when the block started."""
        if self.cores is not None and self.cores > self.BUSY_CORES:
            return True
        return self.loadavg is not None and self.loadavg > self.cpus

    def describe(self) -> str:
        other = "unknown" if self.cores is None else f"{self.cores:.2f} cores"
        load = "unknown" if self.loadavg is None else f"{self.loadavg:.2f}"
        return f"other processes used {other} of {self.cpus} while timing (load average {load})"


def latency_warnings(
    rows: Sequence[tuple[str, object, float, float]], load: OtherLoad | None = None
) -> list[str]:
    """Why latency figures may not hold: a busy machine, or two rows of one architecture (same
    `key`: network and runtime) further apart than their spreads together (and 3 %).

    Args:
        rows: (label, key, ms, spread) per measured model.
    """
    out = []
    if load is not None and load.busy:
        out.append(
            f"the machine was busy: {load.describe()}; these latencies are not reliable, rerun "
            "on a quiet machine"
        )
    for i, (label_a, key_a, ms_a, spread_a) in enumerate(rows):
        for label_b, key_b, ms_b, spread_b in rows[i + 1 :]:
            if key_a != key_b:
                continue
            gap = abs(ms_a - ms_b)
            if gap > spread_a + spread_b and gap > 0.03 * min(ms_a, ms_b):
                out.append(
                    f"{label_a} and {label_b} are the same network and runtime but measured "
                    f"{ms_a:.1f} and {ms_b:.1f} ms, further apart than their spreads "
                    f"({spread_a:.1f}, {spread_b:.1f}): the machine's load changed while timing"
                )
    return out
