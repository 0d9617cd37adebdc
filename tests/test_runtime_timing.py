"""Latency figures that hold under load (issue 33, part 1).

The quickstart scoreboard printed 337 and 161 ms/img for the student and PGD rows, the same
network, on a loaded machine (48 and 47 on a quiet rerun): it took the median of per-round
medians, which a burst of load moves. These tests drive the statistics with given samples; none
asserts on how long anything took.
"""

from __future__ import annotations

import pytest

from pgd_deploy.runtime import timing
from pgd_deploy.runtime.timing import OtherLoad, RobustLatency, interleave, latency_warnings


def test_a_burst_of_load_does_not_move_the_figure() -> None:
    quiet = [[0.048, 0.050, 0.049]] * 5
    loaded = [[0.300, 0.240, 0.337]] * 3  # three rounds of eight hit by another job
    robust = RobustLatency.from_rounds(quiet + loaded)
    assert robust.ms == pytest.approx(48.0)  # median of the per-round minimums
    assert robust.rounds[:5] == pytest.approx([48.0] * 5)
    assert robust.p50 == pytest.approx(50.0)  # the distribution is still reported
    assert RobustLatency.from_rounds(quiet + loaded * 2).ms > 100  # most rounds loaded: it shows


def test_spread_is_the_interquartile_range_of_round_minimums() -> None:
    robust = RobustLatency.from_rounds([[t / 1000] for t in (10, 11, 12, 13, 14)])
    assert robust.ms == 12.0 and robust.spread == pytest.approx(2.0)


def test_interleave_runs_the_calls_round_robin() -> None:
    order: list[str] = []
    calls = [lambda: order.append("a"), lambda: order.append("b")]
    done: list[int] = []
    stats = interleave(calls, rounds=3, per_round=2, warmup=1, progress=done.append)
    assert order[:2] == ["a", "b"]  # warm-up
    # each round: one untimed call, then two timed ones, for a then for b
    assert order[2:] == (["a"] * 3 + ["b"] * 3) * 3
    assert done == [1, 2, 3] and [len(s.rounds) for s in stats] == [3, 3]


def test_two_rows_of_one_network_further_apart_than_their_spreads_are_flagged() -> None:
    rows = [
        ("student", (50, "torch fp32"), 337.0, 20.0),
        ("pgd", (50, "torch fp32"), 161.0, 15.0),
        ("teacher", (101, "torch fp32"), 90.0, 1.0),
    ]
    (warning,) = latency_warnings(rows)
    assert "student and pgd are the same network and runtime" in warning
    assert "337.0 and 161.0 ms" in warning
    rows[0] = ("student", (50, "torch fp32"), 48.0, 0.6)
    rows[1] = ("pgd", (50, "torch fp32"), 47.0, 0.5)
    assert latency_warnings(rows) == []  # 1 ms apart, within the spreads together


def test_a_busy_machine_is_said(monkeypatch) -> None:
    load = OtherLoad(cores=1.3, loadavg=0.5, cpus=2)
    assert load.busy
    (warning,) = latency_warnings([], load)
    assert "the machine was busy: other processes used 1.30 cores of 2" in warning
    assert not OtherLoad(cores=0.02, loadavg=1.0, cpus=2).busy
    assert OtherLoad(cores=None, loadavg=3.5, cpus=2).busy  # no /proc/stat: the load average


def test_other_load_excludes_this_process(monkeypatch) -> None:
    """Another process's CPU time counts, this process's own threads do not."""
    busy = iter([100.0, 103.0])  # the machine: 3 CPU seconds busy during the block
    mine = iter([10.0, 12.0])  # of which this process: 2
    clock = iter([0.0, 2.0])  # over 2 seconds of wall time
    monkeypatch.setattr(timing, "_cpu_busy_seconds", lambda: next(busy))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(
        timing.os, "times", lambda: type("T", (), {"user": next(mine), "system": 0.0})()
    )
    with OtherLoad() as load:
        pass
    assert load.cores == pytest.approx(0.5) and load.busy  # (3 - 2) s / 2 s


def test_scoreboard_warns_about_student_and_pgd() -> None:
    pytest.importorskip("torch")
    from pgd_deploy.quickstart import format_scoreboard, scoreboard_warnings

    def row(name: str, depth: int, ms: float, spread: float) -> dict:
        return {
            "name": name,
            "depth": depth,
            "runtime": "torch fp32",
            "AP": 0.3,
            "AP50": 0.5,
            "params": 1e7,
            "cpu_ms_per_image": ms,
            "cpu_ms_spread": spread,
            "train_iters": 10,
            "seed": 0,
        }

    rows = [row("teacher", 50, 90.0, 1.0), row("student", 18, 337.0, 9.0)]
    rows.append(row("pgd", 18, 161.0, 4.0))
    assert "337.0 ±9.0" in format_scoreboard(rows)
    (warning,) = scoreboard_warnings(rows, None)
    assert warning.startswith("student and pgd are the same network and runtime")
