"""Checkpoint files: atomic saving, safe loading (`weights_only=True`) and format validation.

A checkpoint is a dict:
    format: "pgd-deploy-checkpoint", version: 1,
    model: state dict, config: `to_dict(TrainJob)`, classes: [names], category_ids: [ids],
    iteration, epoch, metrics (dict), and for resuming: optimizer, scheduler, scaler, rng.

This module knows the file format only; `pgd_deploy.models.load_detector` builds the detector
a checkpoint (or a plain state dict) describes. A quantization-aware checkpoint also has `qat`
(`pgd_deploy.qat.checkpoint_entry`): its model is rebuilt with folded BatchNorm and int8 fake
quantizers before the weights are loaded.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from pgd_deploy.config import TrainJob, from_dict
from pgd_deploy.io_utils import atomic_open

FORMAT = "pgd-deploy-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, not ours or inconsistent."""


class UnsafeFileError(ValueError):
    """A file holds code: pickled objects that the safe loader (`weights_only=True`) refuses to
    execute. Deliberately not a `CheckpointError`, so that code falling back to another reader
    after a `CheckpointError` never retries such a file."""


_CODE = re.compile(r"GLOBAL|reduce|Can only (build|create)")


def _unsafe_message(path: Path, err: Exception) -> str:
    text = str(err)
    found = re.search(r"GLOBAL (\S+)", text)
    if found:
        what = f"it asks to import and call {found.group(1)}"
    else:
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        what = detail.group(1).strip() if detail else "objects other than tensors and plain data"
    return (
        f"{path}: refused because the file holds code ({what}): pickled objects that the safe "
        "loader will not execute. Only tensors and plain data are loaded; use a checkpoint "
        "written by pgd-train or a state dict of tensors."
    )


def torch_load_weights(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(path, weights_only=True)` with errors that name the file.

    Raises:
        UnsafeFileError: the file holds code (objects the safe loader will not execute).
        CheckpointError: the file is missing, truncated or not a PyTorch file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # The safe loader refuses an import or a call (code); bytes that are no pickle at all
        # ("Unsupported operand", "String is too long") are a corrupt file.
        if "weights only load failed" in str(err).lower() and _CODE.search(str(err)):
            raise UnsafeFileError(_unsafe_message(path, err)) from None
        raise CheckpointError(
            f"{path}: cannot read checkpoint (truncated or corrupt file?)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: cannot read checkpoint (truncated or corrupt file?): {first}"
        ) from None


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` atomically: a temporary file in the same folder, then rename.

    A crash (or an exception) during the write leaves any previous file at `path` intact.
    """
    with atomic_open(path) as fh:
        torch.save({"format": FORMAT, "version": VERSION, **state}, fh)
    return Path(path)


def is_checkpoint(obj: Any) -> bool:
    """Whether `obj` (a loaded file) carries this project's checkpoint tag."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def validate_checkpoint(obj: Any, path: str | Path = "checkpoint") -> dict[str, Any]:
    """`obj` itself when it is a checkpoint of this project with its weights and config.

    Raises:
        CheckpointError: not a tagged pgd-deploy checkpoint, or without 'model' or 'config'.
    """
    if not is_checkpoint(obj):
        raise CheckpointError(
            f"{path}: not a pgd-deploy checkpoint (expected a dict with format={FORMAT!r}; "
            "a plain state dict can be given to the distiller as a teacher)"
        )
    for key in ("model", "config"):
        if key not in obj:
            raise CheckpointError(f"{path}: checkpoint has no '{key}' entry")
    return obj


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint of this project with `torch.load(weights_only=True)`.

    Raises:
        CheckpointError: the file is missing, truncated/corrupt, or not a pgd-deploy checkpoint.
        UnsafeFileError: the file holds code, which is never executed.
    """
    return validate_checkpoint(torch_load_weights(path, map_location), path)


def checkpoint_config(state: dict[str, Any], path: str | Path = "checkpoint") -> TrainJob:
    """The training config stored in a checkpoint.

    Raises:
        CheckpointError: the stored config is not a valid `TrainJob` (the message names the key).
    """
    try:
        return from_dict(TrainJob, state["config"], source=f"{path} [config]")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
