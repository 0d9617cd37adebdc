"""A detector from a file: a pgd-deploy checkpoint or a plain state dict -> a `DenseDetector`.

The one place where a file becomes a detector, for every stage: evaluation, export, the torch
backend, the demo and the distillation teacher. The architecture comes from the training config
stored in the checkpoint; a file without a config (a plain state dict, accepted only when the
caller names a `default_depth`, as the teacher loader does) is read as the default head
(`model.head`) on that ResNet depth, with the head width, tower depth and class count taken from
the weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pgd_deploy.checkpoint import (
    CheckpointError,
    checkpoint_config,
    is_checkpoint,
    torch_load_weights,
    validate_checkpoint,
)
from pgd_deploy.config import ModelConfig, TrainJob
from pgd_deploy.labels import class_labels
from pgd_deploy.models.build import build_detector
from pgd_deploy.models.detector import DenseDetector

CLS_LOGITS = "head.cls_logits.weight"  # [C, Ch, 3, 3]: the class count and the head width
CLS_TOWER = "head.towers.cls_tower."  # + "<block>.0.weight": one conv per block

__all__ = ["LoadedDetector", "load_detector"]


@dataclass
class LoadedDetector:
    """A detector read from a file, with what the file says about it.

    Attributes:
        detector: the `DenseDetector` in eval mode, weights loaded, on the requested device.
        config: the training config stored in the file; for a file without one, the defaults
            with the model section that was inferred from the weights.
        class_names, category_ids: label -> name / dataset category id (`labels.class_labels`).
        checkpoint: the loaded file (`{}` for a plain state dict), weights included.
    """

    detector: DenseDetector
    config: TrainJob
    class_names: list[str]
    category_ids: list[int]
    checkpoint: dict[str, Any] = field(default_factory=dict)


def load_detector(
    path: str | Path, *, device: str | torch.device, default_depth: int | None = None
) -> LoadedDetector:
    """Rebuild the detector a file holds, weights loaded, in eval mode on `device`.

    Args:
        path: a checkpoint of this project (`pgd_deploy.checkpoint`).
        device: where the detector is placed.
        default_depth: None (the default): only checkpoints of this project are accepted.
            A ResNet depth: also an untagged `{"model": ..., "config": ...}` dict or a plain
            state dict of a `DenseDetector`; without a config, the file is read as the default
            head on this depth.

    Raises:
        CheckpointError: the file is missing, truncated, not a detector checkpoint, or its
            weights do not match the architecture it describes (the message names the file).
    """
    path = Path(path)
    raw = torch_load_weights(path, "cpu")
    if default_depth is None or is_checkpoint(raw):
        raw = validate_checkpoint(raw, path)
    weights, config, stored = _parse(raw, path)
    inferred = config is None
    if config is None:
        if default_depth is None:
            raise CheckpointError(f"{path}: checkpoint has no 'config' entry")
        config = TrainJob(model=_infer_model(weights, default_depth, path))
    num_classes = _num_classes(config.model, stored.get("classes"), weights, path)
    # The file holds every weight: never download or read a backbone initialisation.
    model_cfg = dataclasses.replace(config.model, weights="none")
    detector = build_detector(model_cfg, num_classes=num_classes)
    if stored.get("qat"):  # folded BatchNorm and int8 fake quantizers before the weights
        from pgd_deploy.qat import restore_fake_quant

        try:
            restore_fake_quant(detector, stored["qat"], source=str(path))
        except ValueError as err:
            raise CheckpointError(str(err)) from None
    _load_weights(detector, weights, path, model_cfg, num_classes, inferred=inferred)
    names, ids = class_labels(num_classes, stored.get("classes"), stored.get("category_ids"))
    return LoadedDetector(
        detector=detector.to(device).eval(),
        config=config,
        class_names=names,
        category_ids=ids,
        checkpoint=stored,
    )


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _parse(raw: Any, path: Path) -> tuple[Mapping[str, Tensor], TrainJob | None, dict[str, Any]]:
    """(state dict, the stored training config or None, the file's dict or {} for a plain
    state dict)."""
    if isinstance(raw, Mapping) and _is_state_dict(raw.get("model")):
        stored = dict(raw)
        if stored.get("config") is not None:
            return raw["model"], checkpoint_config(stored, path), stored
        return raw["model"], None, stored
    if _is_state_dict(raw):
        return raw, None, {}
    raise CheckpointError(
        f"{path}: not a detector checkpoint (expected a dict with 'model' and 'config', or a "
        f"plain state dict; got a {type(raw).__name__})"
    )


def _infer_model(weights: Mapping[str, Tensor], depth: int, path: Path) -> ModelConfig:
    """The model section of a file without a config: head width and tower depth from the
    weights (not the defaults), the ResNet depth as given."""
    cls_weight = weights.get(CLS_LOGITS)
    if cls_weight is None:
        raise CheckpointError(
            f"{path}: no '{CLS_LOGITS}': not a detector checkpoint of this project's layout"
        )
    convs = sum(1 for k in weights if k.startswith(CLS_TOWER) and k.endswith(".0.weight"))
    return ModelConfig(depth=depth, fpn_channels=int(cls_weight.shape[1]), head_convs=max(convs, 1))


def _num_classes(
    model_cfg: ModelConfig, classes: Any, weights: Mapping[str, Tensor], path: Path
) -> int:
    """The config's class count, else the number of stored class names, else the weights'."""
    if model_cfg.num_classes > 0:
        return model_cfg.num_classes
    if isinstance(classes, (list, tuple)) and classes:
        return len(classes)
    cls_weight = weights.get(CLS_LOGITS)
    if cls_weight is None:
        raise CheckpointError(f"{path}: no class count in its config and no '{CLS_LOGITS}'")
    return int(cls_weight.shape[0])


def _load_weights(
    detector: DenseDetector,
    weights: Mapping[str, Tensor],
    path: Path,
    model_cfg: ModelConfig,
    num_classes: int,
    *,
    inferred: bool,
) -> None:
    """Load `weights` into `detector`; every tensor must fit (frozen-BN files may lack the
    `num_batches_tracked` counters, which are never used)."""
    origin = "given for a file without a config" if inferred else "in its config"
    what = (
        f"{path}: weights do not match the architecture {origin} (depth {model_cfg.depth}, "
        f"head {model_cfg.head}, {num_classes} classes)"
    )
    try:
        missing, unexpected = detector.load_state_dict(weights, strict=False)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise CheckpointError(f"{what}: {' '.join(first[:3])}") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(f"{what}: missing {missing[:5]}, unexpected {unexpected[:5]}")
