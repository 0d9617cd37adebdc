"""The post-processing defaults, defined once (standard library only).

Read by the config schema (`model.*` and the in-graph NMS keys of `export.*`), the detector, the
numpy post-processing every backend shares, the backends (for an artifact whose manifest lacks
them) and the export's in-graph NMS. The values are those of the PGD configs (MMDetection's
`test_cfg`): score 0.05, class-aware NMS at IoU 0.6, 1000
candidates per level before NMS, 100 detections per image.
"""

from __future__ import annotations

from types import MappingProxyType

SCORE_THRESH = 0.05  # a (location, class) pair is a candidate when its score exceeds this
NMS_THRESH = 0.6  # class-aware NMS: IoU above which the lower-scored box is dropped
TOPK_CANDIDATES = 1000  # candidates kept per FPN level (per image with in-graph NMS) before NMS
MAX_DETECTIONS = 100  # detections kept per image

# the keyword arguments of `runtime.postprocess.postprocess`, as the manifests record them
POSTPROCESS_DEFAULTS = MappingProxyType(
    {
        "score_thresh": SCORE_THRESH,
        "nms_thresh": NMS_THRESH,
        "topk_candidates": TOPK_CANDIDATES,
        "max_det": MAX_DETECTIONS,
    }
)

__all__ = [
    "MAX_DETECTIONS",
    "NMS_THRESH",
    "POSTPROCESS_DEFAULTS",
    "SCORE_THRESH",
    "TOPK_CANDIDATES",
]
