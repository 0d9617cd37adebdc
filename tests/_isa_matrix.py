"""`make test-isa`: the trained-fixture tests under several CPU kernel paths, side by side.

A test marked `trained` asserts on a model the run trains (conftest's `trained_run`, the overfit
and trainer tests, ...). ATen and oneDNN choose their floating-point kernels by instruction set,
so the same commit trains a different model on an AVX2 laptop, an AVX-512 server and a CPU with
bf16 or AMX; thread counts change the order of reductions too. A test that holds on one path only
(a margin the fixture happened to clear) passes `make test` here and fails elsewhere. This runs
the marked tests once per path, each in its own pytest process (the variables must be set before
torch loads), and ends with a table: path, outcome, counts, minutes.

    python tests/_isa_matrix.py                 # every path in PATHS
    python tests/_isa_matrix.py sse41 1-thread  # some of them
    python tests/_isa_matrix.py -- -x -k qat    # pytest arguments after --

Exit status 0 when every path passed, 1 otherwise. The paths lower the kernels a CPU would pick;
none can raise them (AVX-512 paths run only on CPUs that have AVX-512).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

# name -> environment of the path; "native" is what this CPU picks by itself
PATHS: dict[str, dict[str, str]] = {
    "native": {},
    "sse41": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "1-thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
}
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
COUNTS = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)")
DESCRIBE = "from pgd_deploy.devices import describe_cpu; print(describe_cpu())"


def _environment(path: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_VARIABLES}
    env.update(path)
    return env


def run_path(name: str, pytest_args: list[str], root: Path) -> tuple[int, str, float]:
    """Run the `trained` tests under path `name`: (exit code, pytest's last line, minutes)."""
    command = [sys.executable, "-m", "pytest", "-m", "trained", "-q", "-p", "no:cacheprovider"]
    started = time.monotonic()
    print(f"\n=== {name}: {' '.join(f'{k}={v}' for k, v in PATHS[name].items()) or '(as is)'}")
    env = _environment(PATHS[name])
    cpu = subprocess.run(
        [sys.executable, "-c", DESCRIBE], cwd=root, env=env, capture_output=True, text=True
    )
    print(f"cpu: {cpu.stdout.strip() or cpu.stderr.strip()}", flush=True)  # as the tests see it
    proc = subprocess.Popen(
        [*command, *pytest_args],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    last = ""
    assert proc.stdout is not None
    for line in proc.stdout:  # pytest's own progress, as it comes
        sys.stdout.write(line)
        sys.stdout.flush()
        if line.strip():
            last = line.strip()
    return proc.wait(), last, (time.monotonic() - started) / 60


def main(argv: list[str]) -> int:
    pytest_args: list[str] = []
    if "--" in argv:
        argv, pytest_args = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    unknown = [name for name in argv if name not in PATHS]
    if unknown:
        print(f"unknown path(s) {unknown}; choose from {list(PATHS)}", file=sys.stderr)
        return 2
    root = Path(__file__).resolve().parent.parent
    rows = []
    for name in argv or list(PATHS):
        code, last, minutes = run_path(name, pytest_args, root)
        counts = ", ".join(f"{n} {what}" for n, what in COUNTS.findall(last)) or last
        rows.append((name, "PASS" if code == 0 else f"FAIL ({code})", counts, minutes))
    print("\nkernel path   outcome    tests                                       min")
    print("-" * 78)
    for name, outcome, counts, minutes in rows:
        print(f"{name:<13} {outcome:<10} {counts:<43} {minutes:5.1f}")
    return 0 if all(outcome == "PASS" for _, outcome, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
