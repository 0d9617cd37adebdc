"""The small rules `run_gates` is built from: which tolerances a precision takes, and how an
in-graph NMS artifact is compared (its reference makes the same candidate cut; its dense twin
gives the tensors)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pgd_deploy.config import GatesConfig
from pgd_deploy.export.gates import (
    _dense,
    agreement_iou,
    map_tolerance,
    parity_tolerances,
    same_candidates,
    tolerance_class,
)


def test_bf16_is_judged_as_fp16_and_every_other_precision_as_itself():
    assert [tolerance_class(p) for p in ("bf16", "fp16", "fp32", "int8")] == [
        "fp16", "fp16", "fp32", "int8"
    ]  # fmt: skip
    gates = GatesConfig()
    assert parity_tolerances("bf16", gates) == parity_tolerances("fp16", gates)
    assert map_tolerance("bf16", gates) == gates.map_tolerance_fp16
    assert agreement_iou("bf16", gates) == gates.agreement_iou
    assert agreement_iou("int8", gates) == gates.agreement_iou_int8


def test_the_reference_of_an_in_graph_nms_artifact_makes_its_candidate_cut():
    nms = SimpleNamespace(in_graph_nms=True, meta={"nms": {"pre_nms_topk": "300"}})
    assert same_candidates(nms) == {"topk_candidates": 300, "level_sizes": None}
    assert same_candidates(SimpleNamespace(in_graph_nms=True, meta={"nms": {}})) == {}
    assert same_candidates(SimpleNamespace(in_graph_nms=True, meta=None)) == {}
    assert same_candidates(SimpleNamespace(in_graph_nms=False, meta=nms.meta)) == {}
    assert same_candidates(SimpleNamespace(meta=nms.meta)) == {}  # a backend without NMS


def test_parity_compares_the_dense_twin_of_an_in_graph_nms_artifact():
    dense, host = SimpleNamespace(in_graph_nms=False), SimpleNamespace()
    nms = SimpleNamespace(in_graph_nms=True)
    assert _dense(nms, dense, "a.onnx") is dense
    assert _dense(host, None, "a.onnx") is host
    with pytest.raises(ValueError, match="^pgd.onnx: in-graph NMS outputs have no dense tensors"):
        _dense(nms, None, "pgd.onnx")
    with pytest.raises(ValueError, match="^candidate: .* pass its dense twin as dense_candidate$"):
        _dense(nms, None, "")
