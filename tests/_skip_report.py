"""What the run did NOT test: a loud end-of-run summary of the skipped tests, and a strict mode.

Every skip falls in one kind:

- real-image: the coco128 images were not found (the reason names coco128);
- library: an optional library failed to import (`pytest.importorskip`: "could not import");
- gpu: a test marked `gpu` or `trt` (no CUDA GPU or TensorRT here);
- cpu: a test of kernels this CPU lacks (the reason starts "this CPU has no", e.g. bf16);
- browser: the headless-browser test without Chromium;
- other: anything else (e.g. a test only meaningful where TensorRT is NOT installed).

The summary names the CPU and the kernel paths the run took (`pgd_deploy.devices.describe_cpu`):
outcomes of the trained-fixture tests depend on them (`make test-isa`), and a reader must know
which paths ran. The same line heads the run.

With PGD_TEST_STRICT=1 (set by `.ci/run`) a run that skipped real-image or library tests fails
(exit 1) even when everything that ran passed: `make test` must not go green having tested much
less. GPU/TensorRT and browser skips never fail it; they are reported.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field

import pytest

STRICT_ENV = "PGD_TEST_STRICT"
FAILING_KINDS = ("real-image", "library")
CPU_REASON = "this CPU has no"  # how a skip for missing instructions starts
TITLES = {
    "real-image": "real-image tests (coco128 not found)",
    "library": "tests whose optional library failed to import",
    "gpu": "GPU / TensorRT tests (no CUDA GPU or TensorRT here)",
    "cpu": "tests of kernels this CPU lacks (they run on CPUs that have them)",
    "browser": "browser test (Chromium not installed)",
    "other": "other skips",
}


def skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def skip_kind(report: pytest.CollectReport | pytest.TestReport) -> str:
    """The kind of a skip (see the module docstring)."""
    reason = skip_reason(report)
    keywords = getattr(report, "keywords", {}) or {}
    if "coco128" in reason:
        return "real-image"
    if "gpu" in keywords or "trt" in keywords:
        return "gpu"
    if reason.startswith(CPU_REASON):
        return "cpu"
    if "chromium" in reason.lower():
        return "browser"
    if reason.startswith("could not import"):
        return "library"
    return "other"


def cpu_line() -> str:
    """The CPU and the kernel paths of this run, or why they are unknown."""
    try:
        from pgd_deploy.devices import describe_cpu
    except ImportError as err:  # torch missing: nothing in the suite runs kernels then
        return f"unknown ({err})"
    return describe_cpu()


@dataclass(eq=False)  # a plugin object must stay hashable
class SkipReport:
    """A pytest plugin: collects the skips of a run, prints them, fails a strict run."""

    strict: bool = False
    skips: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: defaultdict(list))

    def _record(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            self.skips[skip_kind(report)].append((report.nodeid, skip_reason(report)))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._record(report)  # a module-level importorskip skips the whole file

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._record(report)

    def pytest_report_header(self) -> str:
        return f"cpu: {cpu_line()}"

    def failing(self) -> int:
        return sum(len(self.skips[kind]) for kind in FAILING_KINDS)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.strict and self.failing() and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        tr = terminalreporter
        total = sum(len(v) for v in self.skips.values())
        if not total:
            return
        tr.write_sep("=", f"NOT TESTED: {total} skipped (what and why)", yellow=True, bold=True)
        tr.write_line(f"ran on: {cpu_line()}")
        for kind in TITLES:
            items = self.skips.get(kind, [])
            if not items:
                continue
            loud = kind in FAILING_KINDS or kind == "browser"
            named = loud or kind == "cpu"  # which tests: another kind of CPU must run them
            tr.write_line(f"{len(items)} {TITLES[kind]}:", red=loud, bold=True)
            by_reason: dict[str, list[str]] = defaultdict(list)
            for nodeid, reason in items:
                by_reason[reason].append(nodeid)
            for reason, nodeids in by_reason.items():
                tr.write_line(f"  {len(nodeids)} x {reason}")
                for nodeid in nodeids[:8] if named else ():
                    tr.write_line(f"      {nodeid}")
                if named and len(nodeids) > 8:
                    tr.write_line(f"      ... and {len(nodeids) - 8} more")
        if self.failing():
            counts = ", ".join(
                f"{len(self.skips[k])} {k}" for k in FAILING_KINDS if self.skips.get(k)
            )
            if self.strict:
                message = f"{STRICT_ENV}=1: the run FAILS because tests were skipped ({counts})"
            else:
                message = f"this run tested less than the suite: {counts} skipped"
            tr.write_sep("=", message, red=True, bold=True)


def register(config: pytest.Config) -> None:
    """Install the plugin (called from conftest's pytest_configure)."""
    strict = os.environ.get(STRICT_ENV, "") not in ("", "0")
    config.pluginmanager.register(SkipReport(strict=strict), "pgd_skip_report")
