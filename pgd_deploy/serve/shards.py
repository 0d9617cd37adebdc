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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pgd_deploy.io_utils import atomic_write_text, remove_stale_temp_files, write_json

logger = logging.getLogger(__name__)

SHARDS_DIR = "shards"
RUN_FILE = "run.json"


class ShardStore:
    """The shards of one run under `out_dir/shards`.

    Args:
        out_dir: the run's `--out`.
        fingerprint: what makes two runs the same run (artifact and its sha256, source,
            settings); shards of another fingerprint are removed.
    """

    def __init__(self, out_dir: str | Path, fingerprint: Mapping[str, Any]) -> None:
        self.dir = Path(out_dir) / SHARDS_DIR
        self.rows: dict[int, dict[str, Any]] = {}
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
            for row in _read_rows(shard):
                self.rows.setdefault(int(row["index"]), row)
        if self.rows:
            logger.info("resuming: %d images already done in %s", len(self.rows), self.dir)

    def done(self) -> set[int]:
        return set(self.rows)

    def write(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """One shard for these rows (atomically).

        Raises:
            RuntimeError: an image a shard already holds was sent again (the engine skips them:
                written twice would be a bug, never hidden).
        """
        fresh = [dict(r) for r in rows]
        again = [r["path"] for r in fresh if int(r["index"]) in self.rows]
        if again:
            raise RuntimeError(f"{len(again)} image(s) already in a shard sent again: {again[0]}")
        if not fresh:
            return
        first = min(int(r["index"]) for r in fresh)
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in fresh)
        atomic_write_text(self.dir / f"part-{first:09d}.jsonl", text)
        for row in fresh:
            self.rows[int(row["index"])] = row

    def ordered(self) -> list[dict[str, Any]]:
        return [self.rows[i] for i in sorted(self.rows)]

    def write_outputs(self, results_path: Path, failures_path: Path) -> tuple[int, int, int]:
        """predictions.json and failures.json from every shard, in input order; returns
        (images ok, images failed, detections)."""
        predictions: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        for row in self.ordered():
            if row["status"] == "ok":
                predictions.extend(row["detections"])
            else:
                keys = ("index", "path", "image_id", "error")
                failures.append({k: row[k] for k in keys})
        write_json(results_path, predictions)
        write_json(failures_path, failures)
        return len(self.rows) - len(failures), len(failures), len(predictions)


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
