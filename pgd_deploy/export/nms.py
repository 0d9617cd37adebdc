"""Optional in-graph NMS with the standard ONNX `NonMaxSuppression` op, outputs padded to max_det.

Appended to the dense contract (`boxes` [B, N, 4], `scores` [B, N, C], N and C static) so C++ and
Triton consumers need no post-processing:
    num_dets    int32   [B, 1]           detections kept per image (<= max_det)
    det_boxes   float32 [B, max_det, 4]  xyxy network-input pixels, clipped to the input; 0-padded
    det_scores  float32 [B, max_det]     decreasing per image; 0-padded
    det_classes int32   [B, max_det]     contiguous class index; -1-padded
Steps: boxes are clipped to the input canvas; the top `topk` (location, class) pairs of each image
by score, over all levels, are the NMS candidates (`TopK`); class-aware NMS runs on them
(`max_output_boxes_per_class = max_det`); the top `max_det` selections per image are kept. This
is exactly the host post-processing with `topk_candidates=topk` over one level
(`runtime.postprocess.postprocess(..., level_sizes=None)`), which is what the export gates compare
it with, except that the host clips to the image inside the letterbox rather than to the canvas.

TensorRT limits (docs/deployment.md §4; onnx-tensorrt docs/operators.md): its NMS layer considers at
most 5000 candidate boxes per image (2000 on SM 5.3 and 6.2 GPUs, i.e. Jetson Nano / TX2) and its
`TopK` needs K < 3840, so `topk` and `max_det` are at most 3839 here and a plan for an SM 5.3/6.2
GPU needs `topk <= 2000` (`to_tensorrt.check_nms_candidates`). Only standard ops are used
(NonMaxSuppression maps to INMSLayer; no EfficientNMS plugin, docs/deployment.md §4); the thresholds
and K are graph constants recorded in the manifest.
"""

from __future__ import annotations

from typing import Any

from pgd_deploy.export.deploy_model import NMS_OUTPUT_NAMES, OUTPUT_NAMES
from pgd_deploy.runtime.defaults import MAX_DETECTIONS, NMS_THRESH, SCORE_THRESH, TOPK_CANDIDATES

TRT_TOPK_MAX = 3839  # onnx-tensorrt: TopK's K must be less than 3840
TRT_NMS_BOXES = 5000  # INMSLayer top-k box limit per image ...
TRT_NMS_BOXES_SMALL = 2000  # ... on SM 5.3 and 6.2 devices
SMALL_NMS_SM = ((5, 3), (6, 2))


def validate_nms(max_det: int, conf: float, iou: float, topk: int) -> None:
    """Check the in-graph NMS settings against their ranges and TensorRT's limits.

    Raises:
        ValueError: naming the flag and the accepted range.
    """
    if not 1 <= max_det <= TRT_TOPK_MAX:
        raise ValueError(
            f"--max-det: expected 1..{TRT_TOPK_MAX} (TensorRT TopK needs K < 3840), got {max_det}"
        )
    if not 1 <= topk <= TRT_TOPK_MAX:
        raise ValueError(
            f"--nms-topk: expected 1..{TRT_TOPK_MAX} candidates (TensorRT TopK needs K < 3840; "
            f"its NMS layer considers at most {TRT_NMS_BOXES} boxes, {TRT_NMS_BOXES_SMALL} on "
            f"SM 5.3/6.2), got {topk}"
        )
    if not 0.0 <= conf < 1.0:
        raise ValueError(f"--conf: expected a score threshold in [0, 1), got {conf}")
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"--iou: expected an IoU threshold in (0, 1], got {iou}")


class _Graph:
    """Appends named nodes ("nms/...") and constants to an ONNX graph."""

    def __init__(self, graph: Any) -> None:
        import numpy as np
        from onnx import helper, numpy_helper

        self.graph, self.np, self.helper, self.numpy_helper = graph, np, helper, numpy_helper

    def const(self, name: str, value: Any, dtype: Any) -> str:
        array = self.np.asarray(value, dtype=dtype)
        self.graph.initializer.append(self.numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> None:
        node = self.helper.make_node(op, inputs, outputs, name=f"nms/{outputs[0]}", **attrs)
        self.graph.node.append(node)


def _constants(
    g: _Graph,
    *,
    imgsz: tuple[int, int],
    max_det: int,
    conf: float,
    iou: float,
    k: int,
    classes: int,
) -> None:
    np = g.np
    h, w = int(imgsz[0]), int(imgsz[1])
    for name, value, dtype in (
        ("zero_f", 0.0, np.float32),
        ("minus1_f", -1.0, np.float32),
        ("half_neg", -0.5, np.float32),
        ("upper", [w, h, w, h], np.float32),
        ("max_per_class", [max_det], np.int64),
        ("iou", [iou], np.float32),
        ("conf", [conf], np.float32),
        ("k", [max_det], np.int64),
        ("pre_k", [k], np.int64),
        ("flat_shape", [0, -1], np.int64),  # [B, N, C] -> [B, N * C]
        ("num_classes", classes, np.int64),
        ("class_ids", np.arange(classes).reshape(1, classes, 1), np.int64),
        ("xyxy", [1, 1, 4], np.int64),
        ("i0", 0, np.int64),
        ("i1", 1, np.int64),
        ("ax0", [0], np.int64),
        ("ax1", [1], np.int64),
        ("ax_last", [-1], np.int64),
        ("ax_bn", [0, 2], np.int64),
        ("pad_scores", np.full((1, max_det), -1.0), np.float32),
        ("pad_boxes", np.zeros((max_det, 4)), np.float32),
        ("pad_classes", np.full(max_det, -1), np.int64),
        ("minus1_i", -1, np.int64),
    ):
        g.const(f"nms/{name}", value, dtype)


def _preselect(g: _Graph) -> None:
    """Clip boxes; the top K (location, class) pairs per image become the NMS candidates:
    boxes [B, K, 4] and per-class scores [B, C, K] (-1 outside each candidate's own class)."""
    boxes, scores = OUTPUT_NAMES
    g.node("Max", [boxes, "nms/zero_f"], ["nms/boxes_lo"])
    g.node("Min", ["nms/boxes_lo", "nms/upper"], ["nms/boxes_c"])  # clip to the canvas
    g.node("Reshape", [scores, "nms/flat_shape"], ["nms/flat"])  # [B, N * C]
    g.node(
        "TopK",
        ["nms/flat", "nms/pre_k"],
        ["nms/cand_scores", "nms/cand_idx"],  # [B, K], decreasing (TensorRT needs sorted=1)
        axis=1,
        largest=1,
        sorted=1,
    )
    g.node("Div", ["nms/cand_idx", "nms/num_classes"], ["nms/cand_loc"])  # [B, K]
    g.node("Mul", ["nms/cand_loc", "nms/num_classes"], ["nms/cand_base"])
    g.node("Sub", ["nms/cand_idx", "nms/cand_base"], ["nms/cand_cls"])  # [B, K]
    g.node("Unsqueeze", ["nms/cand_loc", "nms/ax_last"], ["nms/cand_loc1"])  # [B, K, 1]
    g.node("Expand", ["nms/cand_loc1", "nms/xyxy"], ["nms/cand_loc4"])  # [B, K, 4]
    g.node("GatherElements", ["nms/boxes_c", "nms/cand_loc4"], ["nms/cand_boxes"], axis=1)
    g.node("Unsqueeze", ["nms/cand_cls", "nms/ax1"], ["nms/cand_cls_row"])  # [B, 1, K]
    g.node("Equal", ["nms/cand_cls_row", "nms/class_ids"], ["nms/own_class"])  # [B, C, K]
    g.node("Unsqueeze", ["nms/cand_scores", "nms/ax1"], ["nms/cand_scores_row"])  # [B, 1, K]
    g.node("Where", ["nms/own_class", "nms/cand_scores_row", "nms/minus1_f"], ["nms/scores_t"])


def _select(g: _Graph) -> None:
    """Class-aware NMS on the candidates; gathers the selections' scores, boxes and classes."""
    g.node(
        "NonMaxSuppression",
        ["nms/cand_boxes", "nms/scores_t", "nms/max_per_class", "nms/iou", "nms/conf"],
        ["nms/selected"],  # [M, 3] (batch, class, candidate)
        center_point_box=0,
    )
    g.node("Gather", ["nms/selected", "nms/i0"], ["nms/sel_b"], axis=1)  # [M]
    g.node("Gather", ["nms/selected", "nms/i1"], ["nms/sel_c"], axis=1)  # [M]
    g.node("Gather", ["nms/selected", "nms/ax_bn"], ["nms/sel_bn"], axis=1)  # [M, 2]
    g.node("GatherND", ["nms/scores_t", "nms/selected"], ["nms/sel_scores"])  # [M]
    g.node("GatherND", ["nms/cand_boxes", "nms/sel_bn"], ["nms/sel_boxes"])  # [M, 4]


def _top_per_image(g: _Graph) -> None:
    """Scatter the M selections into [B, M] (-1 where another image's), pad with max_det -1
    columns so TopK always has enough candidates (constant k), keep the top max_det."""
    g.node("Shape", [OUTPUT_NAMES[0]], ["nms/shape"])
    g.node("Gather", ["nms/shape", "nms/i0"], ["nms/batch"])  # scalar B
    g.node("Range", ["nms/i0", "nms/batch", "nms/i1"], ["nms/batch_ids"])  # [B]
    g.node("Unsqueeze", ["nms/batch_ids", "nms/ax1"], ["nms/batch_col"])  # [B, 1]
    g.node("Unsqueeze", ["nms/sel_b", "nms/ax0"], ["nms/sel_b_row"])  # [1, M]
    g.node("Equal", ["nms/batch_col", "nms/sel_b_row"], ["nms/mine"])  # [B, M]
    g.node("Unsqueeze", ["nms/sel_scores", "nms/ax0"], ["nms/sel_scores_row"])  # [1, M]
    g.node("Where", ["nms/mine", "nms/sel_scores_row", "nms/minus1_f"], ["nms/dense"])
    g.node("Unsqueeze", ["nms/batch", "nms/ax0"], ["nms/batch_1d"])  # [1]
    g.node("Concat", ["nms/batch_1d", "nms/k"], ["nms/pad_shape"], axis=0)  # [B, max_det]
    g.node("Expand", ["nms/pad_scores", "nms/pad_shape"], ["nms/pad_block"])
    g.node("Concat", ["nms/dense", "nms/pad_block"], ["nms/pool_scores"], axis=1)
    g.node(
        "TopK",
        ["nms/pool_scores", "nms/k"],
        ["nms/top_scores", "nms/top_idx"],  # [B, max_det], decreasing
        axis=1,
        largest=1,
        sorted=1,
    )
    g.node("Concat", ["nms/sel_boxes", "nms/pad_boxes"], ["nms/pool_boxes"], axis=0)
    g.node("Concat", ["nms/sel_c", "nms/pad_classes"], ["nms/pool_classes"], axis=0)
    g.node("Gather", ["nms/pool_boxes", "nms/top_idx"], ["nms/top_boxes"], axis=0)
    g.node("Gather", ["nms/pool_classes", "nms/top_idx"], ["nms/top_classes"], axis=0)


def _outputs(g: _Graph, max_det: int) -> None:
    """Zero the padding (score -1: padding or another image's selection), cast, declare."""
    import onnx

    g.node("Greater", ["nms/top_scores", "nms/half_neg"], ["nms/valid"])  # [B, max_det]
    g.node("Unsqueeze", ["nms/valid", "nms/ax_last"], ["nms/valid_4"])
    g.node("Where", ["nms/valid_4", "nms/top_boxes", "nms/zero_f"], ["det_boxes"])
    g.node("Where", ["nms/valid", "nms/top_scores", "nms/zero_f"], ["det_scores"])
    g.node("Where", ["nms/valid", "nms/top_classes", "nms/minus1_i"], ["nms/classes64"])
    g.node("Cast", ["nms/classes64"], ["det_classes"], to=onnx.TensorProto.INT32)
    g.node("Cast", ["nms/valid"], ["nms/valid_i"], to=onnx.TensorProto.INT32)
    g.node("ReduceSum", ["nms/valid_i", "nms/ax1"], ["num_dets"], keepdims=1)  # [B, 1]
    f32, i32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32
    del g.graph.output[:]
    g.graph.output.extend(
        [
            g.helper.make_tensor_value_info(NMS_OUTPUT_NAMES[0], i32, ["batch", 1]),
            g.helper.make_tensor_value_info(NMS_OUTPUT_NAMES[1], f32, ["batch", max_det, 4]),
            g.helper.make_tensor_value_info(NMS_OUTPUT_NAMES[2], f32, ["batch", max_det]),
            g.helper.make_tensor_value_info(NMS_OUTPUT_NAMES[3], i32, ["batch", max_det]),
        ]
    )


def dense_dims(model: Any) -> tuple[int, int]:
    """(N, C) of a dense-contract model's `scores` output.

    Raises:
        ValueError: the outputs are not `boxes`, `scores`, or N / C are not fixed numbers.
    """
    names = [o.name for o in model.graph.output]
    if names != list(OUTPUT_NAMES):
        raise ValueError(f"append_nms: expected outputs {list(OUTPUT_NAMES)}, got {names}")
    dims = model.graph.output[1].type.tensor_type.shape.dim
    if len(dims) != 3 or not all(d.HasField("dim_value") for d in dims[1:]):
        shown = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
        raise ValueError(
            f"append_nms: 'scores' must be [batch, N, C] with fixed N and C, got {shown} "
            "(to_onnx.fix_output_dims fixes them)"
        )
    return int(dims[1].dim_value), int(dims[2].dim_value)


def append_nms(
    model: Any,
    *,
    imgsz: tuple[int, int],
    max_det: int = MAX_DETECTIONS,
    conf: float = SCORE_THRESH,
    iou: float = NMS_THRESH,
    topk: int = TOPK_CANDIDATES,
) -> Any:
    """Return a copy of the dense-contract ONNX model with NMS appended (see the module docstring).

    Args:
        model: ONNX ModelProto with float32 outputs `boxes` [B, N, 4] and `scores` [B, N, C], N
            and C fixed.
        imgsz: (H, W) network input; boxes are clipped to it before NMS.
        max_det: detections kept per image (the padded length).
        conf: score threshold (scores <= conf are dropped).
        iou: IoU threshold (a box overlapping a higher-scored one of its class by more is dropped).
        topk: (location, class) candidates per image before NMS (min(topk, N * C) are taken).

    Raises:
        ValueError: bad settings, or a model without the dense contract outputs.
    """
    import onnx

    validate_nms(max_det, conf, iou, topk)
    n, c = dense_dims(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = _Graph(out.graph)
    k = min(topk, n * c)
    _constants(g, imgsz=imgsz, max_det=max_det, conf=conf, iou=iou, k=k, classes=c)
    _preselect(g)
    _select(g)
    _top_per_image(g)
    _outputs(g, max_det)
    onnx.checker.check_model(out)
    return out


def nms_settings(
    mode: str,
    *,
    max_det: int,
    conf: float,
    iou: float,
    topk: int = TOPK_CANDIDATES,
    candidates: int = 0,
) -> dict[str, Any]:
    """The manifest's "nms" entry (`candidates`: N * C, which caps the pre-NMS top-k)."""
    if mode == "none":
        return {"mode": "none"}
    k = min(topk, candidates) if candidates else topk
    return {
        "mode": mode,
        "op": "NonMaxSuppression (ONNX standard, class-aware)",
        "max_det": int(max_det),
        "conf": float(conf),
        "iou": float(iou),
        "pre_nms_topk": int(k),
        "candidates": "top pre_nms_topk (location, class) pairs per image over all levels",
        "outputs": list(NMS_OUTPUT_NAMES),
        "padding": {"det_boxes": 0.0, "det_scores": 0.0, "det_classes": -1},
    }
