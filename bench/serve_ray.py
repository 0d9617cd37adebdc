"""`pgd-serve predict` on the local engine and on Ray with 1 and 2 actors, side by side in one run.

Every mode runs the real command (`pgd_deploy.cli.serve_main`) in a process of its own over the
same images, so each figure includes what a user waits for (reading the artifact, decoding,
inference, post-processing, writing the outputs; on Ray also starting the actors), and the
driver's peak memory is that process's high-water mark (VmHWM). The Ray runs join one local Ray
this script starts (so Ray's own start-up, a few seconds once per cluster, is not in them) and
stops at the end. Rounds alternate the order of the modes (A-B-C, C-B-A, ...) so that a change
of load on a shared machine hits all of them alike; it prints images/s per round, the medians,
the ratio of each mode to the local engine (median of the per-round ratios) and the peak memory.

    python bench/serve_ray.py                                   # the demo's int8 PGD student
    python bench/serve_ray.py --model exports/pgd.onnx --repeat 2 --rounds 3

On a machine of N cores, the local Ray gets max(N, what the pool needs) CPUs: each actor takes
--cpus-per-actor, and the decode tasks share what is left.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COCO128 = Path(
    os.environ.get("PGD_COCO128")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"
)
DEFAULT_MODEL = Path("exports/pgd-int8_int8_cpu.onnx")  # written by `make demo`
DRIVER = (
    "import re, sys; from pgd_deploy.cli import serve_main; code = serve_main(sys.argv[1:]); "
    "print('VmHWM', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]); "
    "sys.exit(code)"
)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default=str(DEFAULT_MODEL), help=f"artifact (default: {DEFAULT_MODEL})"
    )
    p.add_argument("--images", default=str(COCO128 / "images" / "val2017"), help="image folder")
    p.add_argument("--repeat", type=int, default=1, help="list every image this many times")
    p.add_argument("--batch", type=int, default=8, help="images per inference call")
    p.add_argument("--rounds", type=int, default=2, help="rounds of every mode")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="Ray CPUs of each actor")
    return p.parse_args()


def _cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        name = re.search(r"model name\s*:\s*(.+)", text)[1].strip()
    except (OSError, TypeError):
        name = "unknown CPU"
    return f"{name}, {os.cpu_count()} logical cores"


def run_mode(argv: list[str]) -> tuple[float, float, str]:
    """(seconds, driver peak MB, summary table) of one `pgd-serve predict` process."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, *argv], capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"pgd-serve predict {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    table, _, peak = proc.stdout.rpartition("VmHWM")
    return seconds, int(peak) / 1024, table


def main() -> int:
    args = _parse()
    model, images = Path(args.model), Path(args.images)
    if not model.is_file():
        print(f"error: no artifact at {model}: run `make demo` or pass --model", file=sys.stderr)
        return 2
    if not images.is_dir():
        print(f"error: no images at {images}: pass --images or set PGD_COCO128", file=sys.stderr)
        return 2
    import ray

    files = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    need = math.ceil(2 * args.cpus_per_actor + 0.5)  # two actors and one decode task at least
    cpus = max(os.cpu_count() or 1, need)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        address = ray.get_runtime_context().gcs_address
        with tempfile.TemporaryDirectory(prefix="pgd-serve-ray-bench-") as tmp_name:
            tmp = Path(tmp_name)
            listing = tmp / "images.txt"
            listing.write_text("".join(f"{p}\n" for p in files * args.repeat))
            n = len(files) * args.repeat
            base = ["predict", "--model", str(model), "--source", str(listing), "--no-progress"]
            base += ["--batch", str(args.batch)]
            ray_args = ["--engine", "ray", "--address", address]
            ray_args += ["--cpus-per-actor", str(args.cpus_per_actor)]
            modes = {
                "local": base,
                "ray, 1 actor": [*base, *ray_args, "--actors", "1"],
                "ray, 2 actors": [*base, *ray_args, "--actors", "2"],
            }
            print(f"{model} on {n} images, batch {args.batch}; {_cpu()}; Ray {cpus} CPUs")
            rates: dict[str, list[float]] = {m: [] for m in modes}
            peaks: dict[str, float] = {m: 0.0 for m in modes}
            run_mode([*modes["local"], "--out", str(tmp / "warm")])  # warm the file cache
            for r in range(args.rounds):
                order = list(modes) if r % 2 == 0 else list(reversed(modes))
                for mode in order:
                    out = tmp / f"{r}-{mode.replace(' ', '_').replace(',', '')}"
                    seconds, peak, _ = run_mode([*modes[mode], "--out", str(out)])
                    rates[mode].append(n / seconds)
                    peaks[mode] = max(peaks[mode], peak)
                print(
                    f"round {r + 1}: " + ", ".join(f"{m} {rates[m][-1]:.2f}" for m in modes),
                    flush=True,
                )
    finally:
        ray.shutdown()
    print()
    print(f"{'mode':<14}  {'images/s':>9}  {'x local':>8}  {'driver peak MB':>14}")
    for mode in modes:
        ratio = statistics.median(a / b for a, b in zip(rates[mode], rates["local"], strict=True))
        median = statistics.median(rates[mode])
        print(f"{mode:<14}  {median:>9.2f}  {ratio:>8.2f}  {peaks[mode]:>14.0f}")
    print("(images/s: the whole command per image, set-up included; medians of the rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
