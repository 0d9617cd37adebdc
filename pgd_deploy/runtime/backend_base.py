"""`Backend`: the interface every inference backend implements (numpy and PIL only).

Every backend letterboxes with `runtime.preprocess`, runs its model on the fixed contract
(images [B, 3, H, W] -> boxes [B, N, 4], scores [B, N, C]) and post-processes with
`runtime.postprocess`; the backends themselves are in `runtime.backends` (ONNX Runtime and
`load_backend`), `runtime.torch_backend` and `runtime.trt_backend`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pgd_deploy.labels import class_labels
from pgd_deploy.runtime.defaults import POSTPROCESS_DEFAULTS
from pgd_deploy.runtime.postprocess import drop_degenerate, postprocess_batch
from pgd_deploy.runtime.preprocess import ImageTransform, preprocess
from pgd_deploy.structures import Detections


def evaluation_metric(meta: dict[str, Any]) -> str:
    """How the model's data is evaluated: `meta["metric"]`, else the `data.metric` of the
    training config an export manifest records ("coco" when neither says)."""
    if meta.get("metric"):
        return str(meta["metric"])
    config = (meta.get("source") or {}).get("train_config") or {}
    return str((config.get("data") or {}).get("metric") or "coco")


class Backend:
    """Common interface. Subclasses implement `infer` (raw contract outputs, numpy).

    Attributes:
        name: "torch", "onnxruntime" or "tensorrt".
        precision: "fp32", "fp16" or "int8".
        input_size: (H, W) letterbox size of the network input.
        class_names, category_ids: contiguous class index -> name / dataset category id.
        level_sizes: locations per FPN level (per-level top-k in post-processing), or None.
        postprocess_kwargs: score_thresh, nms_thresh, topk_candidates, max_det.
        max_batch: largest batch one `infer` call accepts.
        warnings: the verification checks it failed and was served despite
            (`runtime.verify`, `--allow-unverified` / `--allow-failed`); empty when verified.
    """

    name = "backend"
    precision = "fp32"
    max_batch = 64
    in_graph_nms = False
    warnings: Sequence[str] = ()

    def __init__(self, meta: dict[str, Any]) -> None:
        self.input_size: tuple[int, int] = (int(meta["imgsz"][0]), int(meta["imgsz"][1]))
        names, ids = class_labels(0, meta.get("class_names"), meta.get("category_ids"))
        self.class_names: list[str] = names
        self.category_ids: list[int] = ids
        self.level_sizes: list[int] | None = meta.get("level_sizes")
        post = {**POSTPROCESS_DEFAULTS, **meta.get("postprocess", {})}
        self.postprocess_kwargs = {
            "score_thresh": float(post["score_thresh"]),
            "nms_thresh": float(post["nms_thresh"]),
            "topk_candidates": int(post["topk_candidates"]),
            "max_det": int(post["max_det"]),
        }
        self.meta = meta
        self.metric: str = evaluation_metric(meta)

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run the network on float32 [B, 3, H, W]; returns its named outputs as numpy arrays."""
        raise NotImplementedError

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[ImageTransform]]:
        """Letterbox uint8 RGB images to this backend's input size."""
        return preprocess(images, self.input_size)

    def postprocess(
        self, outputs: dict[str, np.ndarray], transforms: Sequence[ImageTransform], **overrides
    ) -> list[Detections]:
        kwargs = {**self.postprocess_kwargs, **overrides}
        level_sizes = kwargs.pop("level_sizes", self.level_sizes)  # None: one top-k per image
        if "det_boxes" in outputs:  # NMS already ran in the graph: threshold and un-letterbox only
            dets = []
            for i, tf in enumerate(transforms):
                n = int(np.asarray(outputs["num_dets"][i]).reshape(-1)[0])
                n = min(n, kwargs["max_det"])
                det = Detections(
                    tf.to_original(outputs["det_boxes"][i, :n]),
                    outputs["det_scores"][i, :n],
                    outputs["det_classes"][i, :n],
                )
                dets.append(drop_degenerate(det.filter(kwargs["score_thresh"])))
            return dets
        return postprocess_batch(
            outputs["boxes"], outputs["scores"], transforms, level_sizes=level_sizes, **kwargs
        )

    def predict(self, images: Sequence[np.ndarray], **overrides) -> list[Detections]:
        """uint8 RGB images -> detections in original pixels (pre, infer, post)."""
        batch, transforms = self.preprocess(images)
        return self.postprocess(self.infer(batch), transforms, **overrides)

    def sync(self) -> None:
        """Wait for asynchronous device work (GPU backends override)."""

    def describe(self) -> str:
        h, w = self.input_size
        return f"{self.name} {self.precision} {h}x{w}"
