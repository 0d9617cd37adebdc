"""The durable record of a `--engine ray` run: one JSON Lines shard per batch of results.

Each result batch the driver receives becomes `shards/part-<first index>.jsonl` under `--out`,
written atomically (a temporary file, fsynced, renamed): one row per image with its index, path,
image id, size, status (`ok` or `error`), error and COCO detections. A run killed at any moment
(the driver or an actor, even by SIGKILL) leaves only whole shards; a rerun into the same `--out`
with the same artifact, source and settings (`shards/run.json`) skips every image a shard holds
and finishes the rest, so the final files hold each image exactly once. A rerun with anything
else replaces the shards. `predictions.json`, `failures.json` (and `metrics.json`) are written
from all the shards at the end, in input order, as the local engine writes them.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgd_deploy.io_utils import atomic_open, atomic_write_text, remove_stale_temp_files, write_json

logger = logging.getLogger(__name__)

SHARDS_DIR = "shards"
RUN_FILE = "run.json"


@dataclass
class ShardTotals:
    """What `ShardStore.write_outputs` wrote, for the summary (and `--eval`).

    Attributes:
        ok, failed: images with status ok / error.
        detections: entries of predictions.json.
        save_errors: images whose annotated copy could not be written.
        image_ids: the image id of every image done, in input order.
        errors: the error of every failed image, in input order.
    """

    ok: int = 0
    failed: int = 0
    detections: int = 0
    save_errors: int = 0
    image_ids: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class ShardStore:
    """The shards of one run under `out_dir/shards`.

    The driver holds only the indices done and where each shard's range is, never the
    detections: predictions.json is streamed from the shards at the end, one shard at a time,
    so a run over millions of images needs no more driver memory than one over a thousand.

    Args:
        out_dir: the run's `--out`.
        fingerprint: what makes two runs the same run (artifact and its sha256, source,
            settings); shards of another fingerprint are removed.
    """

    def __init__(self, out_dir: str | Path, fingerprint: Mapping[str, Any]) -> None:
        self.dir = Path(out_dir) / SHARDS_DIR
        self._done: set[int] = set()
        self._shards: list[tuple[int, int, Path]] = []  # (first index, last index, file)
        run_file = self.dir / RUN_FILE
        previous = _read_json(run_file)
        if previous is not None and previous != dict(fingerprint):
            logger.info("replacing the shards of another run in %s", self.dir)
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        for leftover in remove_stale_temp_files(self.dir):
            logger.info("removed %s, left by a run that was killed", leftover)
        if previous != dict(fingerprint):
            write_json(run_file, dict(fingerprint))
        for shard in sorted(self.dir.glob("part-*.jsonl")):
            indices = [int(row["index"]) for row in _read_rows(shard)]
            if not indices:
                continue
            if self._done.intersection(indices):  # never written by this engine (it refuses)
                logger.warning("%s repeats images of another shard: removed, redone", shard)
                shard.unlink()
                continue
            self._add(shard, indices)
        if self._done:
            logger.info("resuming: %d images already done in %s", len(self._done), self.dir)

    def __len__(self) -> int:
        return len(self._done)

    def done(self) -> set[int]:
        return set(self._done)

    def _add(self, shard: Path, indices: list[int]) -> None:
        self._done.update(indices)
        self._shards.append((min(indices), max(indices), shard))

    def write(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """One shard for these rows (atomically).

        Raises:
            RuntimeError: an image a shard already holds was sent again (the engine skips them:
                written twice would be a bug, never hidden).
        """
        fresh = [dict(r) for r in rows]
        again = [r["path"] for r in fresh if int(r["index"]) in self._done]
        if again:
            raise RuntimeError(f"{len(again)} image(s) already in a shard sent again: {again[0]}")
        if not fresh:
            return
        indices = [int(r["index"]) for r in fresh]
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in fresh)
        shard = self.dir / f"part-{min(indices):09d}.jsonl"
        atomic_write_text(shard, text)
        self._add(shard, indices)

    def ordered(self) -> Iterator[dict[str, Any]]:
        """Every row, in input order: shard by shard when their index ranges do not interleave
        (as this engine writes them), else all rows at once, sorted."""
        shards = sorted(self._shards)
        if all(a[1] < b[0] for a, b in zip(shards, shards[1:])):
            for _, _, shard in shards:
                yield from sorted(_read_rows(shard), key=lambda r: int(r["index"]))
            return
        rows = [row for _, _, shard in shards for row in _read_rows(shard)]
        yield from sorted(rows, key=lambda r: int(r["index"]))

    def write_outputs(self, results_path: Path, failures_path: Path) -> ShardTotals:
        """predictions.json and failures.json from every shard, in input order (the local
        engine's files), predictions streamed into place atomically."""
        totals = ShardTotals()
        failures: list[dict[str, Any]] = []
        with atomic_open(results_path) as fh:
            fh.write(b"[")
            for row in self.ordered():
                totals.image_ids.append(int(row["image_id"]))
                totals.save_errors += bool(row.get("save_error"))
                if row["status"] != "ok":
                    failures.append({k: row[k] for k in ("index", "path", "image_id", "error")})
                    totals.errors.append(str(row["error"]))
                    continue
                totals.ok += 1
                for entry in row["detections"]:
                    lead = ",\n" if totals.detections else "\n"
                    fh.write((lead + json.dumps(entry, separators=(",", ":"))).encode("utf-8"))
                    totals.detections += 1
            fh.write(b"\n]\n")
        write_json(failures_path, failures)
        totals.failed = len(failures)
        return totals


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _read_rows(shard: Path) -> list[dict[str, Any]]:
    """The rows of one shard; a shard that cannot be read is removed (its images are redone)."""
    try:
        rows = [json.loads(line) for line in shard.read_text().splitlines() if line]
        if all(isinstance(r, dict) and "index" in r and "status" in r for r in rows):
            return rows
    except (OSError, ValueError):
        pass
    logger.warning("%s is not a shard this engine wrote: removed, its images are redone", shard)
    shard.unlink(missing_ok=True)
    return []
