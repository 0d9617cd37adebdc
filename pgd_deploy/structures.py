"""Plain numpy containers shared by every backend (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Detections:
    """Detections of one image, in original-image pixel coordinates.

    Attributes:
        boxes: float32 [N, 4] xyxy pixels.
        scores: float32 [N] confidences in [0, 1], sorted in decreasing order.
        labels: int64 [N] contiguous 0-based class indices (map to dataset ids with the class list).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        n = len(self.boxes)
        if len(self.scores) != n or len(self.labels) != n:
            raise ValueError(
                f"Detections: boxes, scores and labels must have the same length, got "
                f"{n}, {len(self.scores)}, {len(self.labels)}"
            )

    def __len__(self) -> int:
        return len(self.boxes)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def filter(self, score_thresh: float) -> Detections:
        keep = self.scores >= score_thresh
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep])
