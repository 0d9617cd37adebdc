"""The work folder of a training run: what `fit` checks before it writes anything there.

A work folder holds one run: last.pt, best.pt, config.toml, metrics.json, curves.png and
tensorboard/. Training into a folder that holds a run continues it (`resume`) or replaces it
(`overwrite`), never silently; a resume keeps the architecture and the label set of last.pt, and
these checks run before config.toml or any checkpoint is touched.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pgd_deploy.checkpoint import CheckpointError, checkpoint_config
from pgd_deploy.config import TrainJob

logger = logging.getLogger(__name__)

RUN_FILES = ("last.pt", "best.pt", "metrics.json", "curves.png")  # what a run leaves behind
# Fields that shape the weights: a checkpoint only loads into the same values.
ARCHITECTURE_FIELDS = ("head", "depth", "fpn_channels", "head_convs", "num_classes")


def run_files(work_dir: Path) -> list[str]:
    """The files of a previous run in `work_dir` (empty when it holds none)."""
    return [name for name in RUN_FILES if (work_dir / name).exists()]


def check_start(work_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a run that would silently replace another one.

    Raises:
        ValueError: `resume` and `overwrite` together, or `work_dir` holds a run and neither
            was asked for.
        FileNotFoundError: `resume` without `work_dir/last.pt`.
    """
    if resume and overwrite:
        raise ValueError(
            f"--resume continues the run in {work_dir} and --overwrite replaces it: choose one"
        )
    if resume:
        if not (work_dir / "last.pt").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {work_dir / 'last.pt'}")
        return
    found = run_files(work_dir)
    if found and not overwrite:
        raise ValueError(
            f"{work_dir} already holds a training run ({', '.join(found)}): continue it with "
            "--resume, train into a new --work-dir, or replace it with --overwrite"
        )


def check_resumable(cfg: TrainJob, state: dict[str, Any], path: Path) -> None:
    """A resume must rebuild the model and the optimiser that `state` (last.pt) was saved from.

    Raises:
        CheckpointError: an architecture field (`model.depth`, ...), `train.optimizer` or
            whether `qat.init` is set differs; the message names each field with both values.
    """
    saved = checkpoint_config(state, path)
    diffs = []
    for key in ARCHITECTURE_FIELDS:
        old, new = getattr(saved.model, key), getattr(cfg.model, key)
        if key == "num_classes" and new == 0:
            continue  # taken from the data: compared with the checkpoint's category ids
        if old != new:
            diffs.append(f"model.{key} is {old!r} in the checkpoint but {new!r} now")
    if bool(state.get("qat")) != bool(cfg.qat.init):
        diffs.append(
            "the checkpoint is " + ("" if state.get("qat") else "not ") + "a quantization-aware "
            f"run but qat.init is {cfg.qat.init!r} now"
        )
    if saved.train.optimizer != cfg.train.optimizer:
        diffs.append(
            f"train.optimizer is {saved.train.optimizer!r} in the checkpoint but "
            f"{cfg.train.optimizer!r} now"
        )
    if diffs:
        raise CheckpointError(
            f"{path}: cannot resume with this configuration: {'; '.join(diffs)}. Drop those "
            "overrides to continue the run, or train into a new --work-dir"
        )


def check_same_classes(
    state: dict[str, Any], category_ids: Sequence[int], annotations: Path, path: Path
) -> None:
    """Raises CheckpointError when the training data's categories are not the checkpoint's."""
    saved = state.get("category_ids")
    if saved is not None and list(saved) != list(category_ids):
        raise CheckpointError(
            f"{path}: cannot resume: trained on categories {list(saved)[:10]} but "
            f"{annotations} has {list(category_ids)[:10]}"
        )


def clear_run(work_dir: Path) -> list[str]:
    """Delete the previous run's outputs (for `overwrite`), so that no file of it survives
    beside the new run's; other files in `work_dir` are left alone."""
    removed = run_files(work_dir)
    for name in removed:
        (work_dir / name).unlink()
    if (work_dir / "tensorboard").is_dir():
        shutil.rmtree(work_dir / "tensorboard")
        removed.append("tensorboard/")
    if removed:
        logger.info(
            "--overwrite: removed the previous run's %s from %s", ", ".join(removed), work_dir
        )
    return removed
