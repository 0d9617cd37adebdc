"""The model being exported: a checkpoint of this project, loaded once with its provenance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgd_deploy.config import TrainJob
from pgd_deploy.io_utils import file_sha256


@dataclass
class SourceModel:
    """A loaded checkpoint ready for export.

    Attributes:
        detector: the `DenseDetector` in eval mode (CPU unless a device was asked for).
        path: the checkpoint file; sha256: its hash.
        config: the training config stored in the checkpoint.
        state: the checkpoint dict without its weights (classes, metrics, iteration, ...).
        class_names, category_ids: contiguous class index -> name / dataset category id.
    """

    detector: Any
    path: Path
    sha256: str
    config: TrainJob
    state: dict[str, Any]
    class_names: list[str]
    category_ids: list[int]

    @property
    def postprocess_kwargs(self) -> dict[str, Any]:
        return dict(self.detector.postprocess_kwargs)

    @property
    def description(self) -> str:
        cfg = self.config.model
        return f"{cfg.head.upper()} R{cfg.depth} ({len(self.class_names)} classes)"


def load_source(path: str | Path, device: str = "cpu") -> SourceModel:
    """Load a checkpoint for export.

    Raises:
        CheckpointError: a missing, truncated or foreign file, or weights that do not match the
            architecture in the checkpoint's config (the message names the file).
    """
    from pgd_deploy.models import load_detector

    path = Path(path)
    loaded = load_detector(path, device=device)
    state = loaded.checkpoint
    meta = {k: v for k, v in state.items() if k not in ("model", "optimizer", "scheduler", "rng")}
    return SourceModel(
        detector=loaded.detector,
        path=path,
        sha256=file_sha256(path),
        config=loaded.config,
        state=meta,
        class_names=loaded.class_names,
        category_ids=loaded.category_ids,
    )
