"""What the Ray workers of `pgd-serve predict --engine ray` run (`serve.ray_engine` drives them).

- `decode_batch`, a Ray task: decode and letterbox a batch of inputs (local files or URIs) with
  the local engine's `load_item`; an unreadable image becomes a row with its error.
- `InferActor`, an actor of the pool: opens the artifact once through the runtime (ONNX Runtime
  and TensorRT import no torch), runs and post-processes each batch, and with `--save-images`
  draws the detections on the image (decoded again from its file) into `--out/images`.
- `result_rows`: the shard rows of a result batch, in the driver.

Columns are numpy arrays (`batch_format="numpy"`), so nothing here needs pandas or torch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pgd_deploy.metrics import detections_to_coco
from pgd_deploy.runtime.preprocess import ImageDecodeError, ImageTransform
from pgd_deploy.serve.batcher import load_item
from pgd_deploy.serve.sources import SourceItem, load_source_image

logger = logging.getLogger(__name__)

TRANSFORM_FIELDS = ("scale_x", "scale_y", "orig_h", "orig_w", "resized_h", "resized_w")


def decode_batch(
    batch: dict[str, np.ndarray], *, input_size: Sequence[int], max_pixels: int | None
) -> dict[str, np.ndarray]:
    """Ray task: decode and letterbox a batch of inputs (`serve.batcher.load_item`)."""
    height, width = (int(v) for v in input_size)
    tensors = np.zeros((len(batch["index"]), 3, height, width), np.float32)
    transforms = np.zeros((len(batch["index"]), len(TRANSFORM_FIELDS)), np.float64)
    errors, seconds = [], []
    for i, (index, path, image_id) in enumerate(
        zip(batch["index"], batch["path"], batch["image_id"], strict=True)
    ):
        item = SourceItem(int(index), str(path), str(path), int(image_id))  # a path or a URI
        loaded = load_item(item, (height, width), max_pixels=max_pixels)
        if loaded.ok:
            tensors[i] = loaded.tensor
            transforms[i] = [getattr(loaded.transform, f) for f in TRANSFORM_FIELDS]
        errors.append(loaded.error or "")
        seconds.append(loaded.seconds)
    return {
        **batch,
        "tensor": tensors,
        "transform": transforms,
        "error": np.array(errors, dtype=object),
        "pre_s": np.array(seconds, np.float64),
    }


class InferActor:
    """Ray actor: opens the artifact once; runs and post-processes each batch it is given.

    Its rows come back as the COCO results of each image (a JSON string) or its error. With
    `draw_score` set, an image whose row has a `save_to` path is drawn there (detections at or
    above that score); a failed save is the row's `save_error`, never the image's failure.
    """

    def __init__(
        self,
        artifact: str,
        *,
        device: str,
        allow_unverified: bool,
        overrides: dict[str, float],
        category_ids: Sequence[int],
        draw_score: float | None = None,
        max_pixels: int | None = None,
    ) -> None:
        from pgd_deploy.runtime.backends import load_backend

        self.backend = load_backend(artifact, device=device, allow_unverified=allow_unverified)
        self.overrides = overrides
        self.category_ids = category_ids
        self.draw_score = draw_score
        self.max_pixels = max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        results = np.array([""] * len(ok), dtype=object)
        save_errors = np.array([""] * len(ok), dtype=object)
        counts = np.zeros(len(ok), np.int64)
        infer_s = post_s = 0.0
        if ok.any():
            t0 = time.perf_counter()
            raw = self.backend.infer(np.ascontiguousarray(batch["tensor"][ok]))
            self.backend.sync()
            t1 = time.perf_counter()
            transforms = [
                ImageTransform(*(float(v) for v in row[:2]), *(int(v) for v in row[2:]))
                for row in batch["transform"][ok]
            ]
            dets = self.backend.postprocess(raw, transforms, **self.overrides)
            for row, det in zip(np.flatnonzero(ok), dets, strict=True):
                entries = detections_to_coco(int(batch["image_id"][row]), det, self.category_ids)
                results[row] = json.dumps(entries)
                counts[row] = len(entries)
                if self.draw_score is not None and batch["save_to"][row]:
                    save_errors[row] = self._save(batch["path"][row], batch["save_to"][row], det)
            post_s = time.perf_counter() - t1
            infer_s = t1 - t0
        share = float(ok.sum()) or 1.0
        return {
            "index": batch["index"],
            "path": batch["path"],
            "image_id": batch["image_id"],
            "error": batch["error"],
            "results": results,
            "detections": counts,
            "save_error": save_errors,
            "height": batch["transform"][:, 2].astype(np.int64),
            "width": batch["transform"][:, 3].astype(np.int64),
            "pre_s": batch["pre_s"],
            "infer_s": np.where(ok, infer_s / share, 0.0),
            "post_s": np.where(ok, post_s / share, 0.0),
        }

    def _save(self, path: Any, save_to: Any, dets: Any) -> str:
        """Draw `dets` on the image at `path` into `save_to`; the error text, or ""."""
        from pgd_deploy.serve.outputs import save_drawn

        try:
            image = load_source_image(str(path), max_pixels=self.max_pixels)
            names = self.backend.class_names
            save_drawn(Path(str(save_to)), image, dets.filter(self.draw_score), names)
        except (OSError, ImageDecodeError) as err:
            logger.warning("could not write an annotated image of %s: %s", path, err)
            return f"{save_to}: {err}"
        return ""


def result_rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One shard row per image of a result batch."""
    rows = []
    for i, index in enumerate(batch["index"]):
        error = str(batch["error"][i])
        rows.append(
            {
                "index": int(index),
                "path": str(batch["path"][i]),
                "image_id": int(batch["image_id"][i]),
                "height": int(batch["height"][i]) if not error else None,
                "width": int(batch["width"][i]) if not error else None,
                "status": "error" if error else "ok",
                "error": error or None,
                "detections": [] if error else json.loads(batch["results"][i]),
                "save_error": str(batch["save_error"][i]) or None,
            }
        )
    return rows
