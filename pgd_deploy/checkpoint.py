"""Checkpoints: atomic saving, safe loading (`weights_only=True`) and model reconstruction.

A checkpoint is a dict:
    format: "pgd-deploy-checkpoint", version: 1,
    model: state dict, config: `to_dict(TrainJob)`, classes: [names], category_ids: [ids],
    iteration, epoch, metrics (dict), and for resuming: optimizer, scheduler, scaler, rng.
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
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" in str(err).lower():
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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint of this project with `torch.load(weights_only=True)`.

    Raises:
        CheckpointError: the file is missing, truncated/corrupt, or not a pgd-deploy checkpoint.
        UnsafeFileError: the file holds code, which is never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    state = torch_load_weights(path, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a pgd-deploy checkpoint (expected a dict with format={FORMAT!r}; "
            "a plain state dict can be given to the distiller as a teacher)"
        )
    for key in ("model", "config"):
        if key not in state:
            raise CheckpointError(f"{path}: checkpoint has no '{key}' entry")
    return state


def checkpoint_config(state: dict[str, Any], path: str | Path = "checkpoint") -> TrainJob:
    """The training config stored in a checkpoint."""
    try:
        return from_dict(TrainJob, state["config"], source=f"{path} [config]")
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def build_from_checkpoint(state: dict[str, Any], path: str | Path = "checkpoint"):
    """Rebuild the detector stored in a loaded checkpoint, weights loaded, in eval mode."""
    from pgd_deploy.models import build_detector

    cfg = checkpoint_config(state, path)
    classes = state.get("classes") or []
    num_classes = cfg.model.num_classes or len(classes)
    model_cfg = cfg.model
    if model_cfg.weights not in ("none", ""):
        # The checkpoint holds every weight; never re-download or re-read backbone weights.
        import dataclasses

        model_cfg = dataclasses.replace(model_cfg, weights="none")
    model = build_detector(model_cfg, num_classes=num_classes)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise CheckpointError(
            f"{path}: weights do not match the architecture in its config "
            f"(depth {cfg.model.depth}, head {cfg.model.head}, {num_classes} classes): "
            f"{' '.join(first[:3])}"
        ) from None
    return model.eval()


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(detector in eval mode on `device`, TrainJob, checkpoint dict) from a checkpoint file."""
    state = load_checkpoint(path)
    model = build_from_checkpoint(state, path).to(device)
    return model, checkpoint_config(state, path), state
