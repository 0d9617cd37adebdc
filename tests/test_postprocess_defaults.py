"""The post-processing defaults (score 0.05, NMS 0.6, 1000 candidates, 100 detections) have one
definition, `pgd_deploy.runtime.defaults`; every other place that has a default reads it
(issue 34, part 3): changed there before the rest is imported, they change everywhere."""

from __future__ import annotations

import json
import subprocess
import sys

from pgd_deploy.runtime import defaults

# In a fresh interpreter: other values in the one definition, then every place's defaults.
PROBE = """
import inspect, json, types
from pgd_deploy.runtime import defaults as d
d.SCORE_THRESH, d.NMS_THRESH, d.TOPK_CANDIDATES, d.MAX_DETECTIONS = 0.25, 0.45, 77, 9
d.POSTPROCESS_DEFAULTS = types.MappingProxyType(
    {"score_thresh": 0.25, "nms_thresh": 0.45, "topk_candidates": 77, "max_det": 9})
from pgd_deploy.config import ExportConfig, ModelConfig
from pgd_deploy.export.nms import append_nms, nms_settings
from pgd_deploy.models.detector import DenseDetector
from pgd_deploy.runtime.backends import Backend
from pgd_deploy.runtime.postprocess import postprocess

def signature(fn, *names):
    params = inspect.signature(fn).parameters
    return [params[n].default for n in names]

m, e = ModelConfig(), ExportConfig()
print(json.dumps({
    "ModelConfig": [m.score_thresh, m.nms_thresh, m.topk_candidates, m.max_detections],
    "ExportConfig": [e.conf, e.iou, e.nms_topk, e.max_det],
    "postprocess": signature(postprocess, "score_thresh", "nms_thresh", "topk_candidates",
                             "max_det"),
    "DenseDetector": signature(DenseDetector.__init__, "score_thresh", "nms_thresh",
                               "topk_candidates", "max_detections"),
    "append_nms": signature(append_nms, "conf", "iou", "topk", "max_det"),
    "nms_settings": [0.25, 0.45] + signature(nms_settings, "topk") + [9],
    "Backend": list(Backend({"imgsz": [64, 64]}).postprocess_kwargs.values()),
}))
"""


def test_the_one_definition_has_the_pgd_configs_values() -> None:
    assert dict(defaults.POSTPROCESS_DEFAULTS) == {
        "score_thresh": 0.05,
        "nms_thresh": 0.6,
        "topk_candidates": 1000,
        "max_det": 100,
    }
    assert list(defaults.POSTPROCESS_DEFAULTS.values()) == [
        defaults.SCORE_THRESH,
        defaults.NMS_THRESH,
        defaults.TOPK_CANDIDATES,
        defaults.MAX_DETECTIONS,
    ]


def test_every_default_reads_the_one_definition() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    found = json.loads(out.strip().splitlines()[-1])
    wrong = {place: values for place, values in found.items() if values != [0.25, 0.45, 77, 9]}
    assert not wrong, f"defaults not read from pgd_deploy.runtime.defaults: {wrong}"
