"""Optional in-graph NMS with the standard ONNX `NonMaxSuppression` op, outputs padded to max_det.

Appended to the dense contract (`boxes` [B, N, 4], `scores` [B, N, C]) so C++ and Triton
consumers need no post-processing:
    num_dets    int32   [B, 1]           detections kept per image (<= max_det)
    det_boxes   float32 [B, max_det, 4]  xyxy network-input pixels, clipped to the input; 0-padded
    det_scores  float32 [B, max_det]     decreasing per image; 0-padded
    det_classes int32   [B, max_det]     contiguous class index; -1-padded
NMS is class-aware (the op runs per class), `max_output_boxes_per_class = max_det` and the top
`max_det` over all classes are kept per image, which is exactly the host-side post-processing
except for its per-level top-k pre-selection (a speed shortcut that only affects low-score
candidates) and its clipping to the image rather than the letterbox canvas. Only standard ops are
used (TensorRT maps NonMaxSuppression to INMSLayer; no EfficientNMS plugin, deployment.md 1.2);
the thresholds are graph constants recorded in the manifest.
"""

from __future__ import annotations

from typing import Any

from pgd_deploy.export.deploy_model import NMS_OUTPUT_NAMES, OUTPUT_NAMES

TRT_TOPK_MAX = 3840  # TensorRT's largest TopK k


def _validate(max_det: int, conf: float, iou: float) -> None:
    if not 1 <= max_det <= TRT_TOPK_MAX:
        raise ValueError(f"--max-det: expected 1..{TRT_TOPK_MAX} (TensorRT TopK), got {max_det}")
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


def _constants(g: _Graph, *, imgsz: tuple[int, int], max_det: int, conf: float, iou: float) -> None:
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


def _select(g: _Graph) -> None:
    """Class-aware NMS on clipped boxes; gathers the K selections' scores, boxes and classes."""
    boxes, scores = OUTPUT_NAMES
    g.node("Max", [boxes, "nms/zero_f"], ["nms/boxes_lo"])
    g.node("Min", ["nms/boxes_lo", "nms/upper"], ["nms/boxes_c"])  # clip to the canvas
    g.node("Transpose", [scores], ["nms/scores_t"], perm=[0, 2, 1])  # [B, C, N]
    g.node(
        "NonMaxSuppression",
        ["nms/boxes_c", "nms/scores_t", "nms/max_per_class", "nms/iou", "nms/conf"],
        ["nms/selected"],  # [K, 3] (batch, class, box)
        center_point_box=0,
    )
    g.node("Gather", ["nms/selected", "nms/i0"], ["nms/sel_b"], axis=1)  # [K]
    g.node("Gather", ["nms/selected", "nms/i1"], ["nms/sel_c"], axis=1)  # [K]
    g.node("Gather", ["nms/selected", "nms/ax_bn"], ["nms/sel_bn"], axis=1)  # [K, 2]
    g.node("GatherND", ["nms/scores_t", "nms/selected"], ["nms/sel_scores"])  # [K]
    g.node("GatherND", ["nms/boxes_c", "nms/sel_bn"], ["nms/sel_boxes"])  # [K, 4]


def _top_per_image(g: _Graph) -> None:
    """Scatter the K selections into [B, K] (-1 where another image's), pad with max_det -1
    columns so TopK always has enough candidates (constant k), keep the top max_det."""
    g.node("Shape", [OUTPUT_NAMES[0]], ["nms/shape"])
    g.node("Gather", ["nms/shape", "nms/i0"], ["nms/batch"])  # scalar B
    g.node("Range", ["nms/i0", "nms/batch", "nms/i1"], ["nms/batch_ids"])  # [B]
    g.node("Unsqueeze", ["nms/batch_ids", "nms/ax1"], ["nms/batch_col"])  # [B, 1]
    g.node("Unsqueeze", ["nms/sel_b", "nms/ax0"], ["nms/sel_b_row"])  # [1, K]
    g.node("Equal", ["nms/batch_col", "nms/sel_b_row"], ["nms/mine"])  # [B, K]
    g.node("Unsqueeze", ["nms/sel_scores", "nms/ax0"], ["nms/sel_scores_row"])  # [1, K]
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


def append_nms(
    model: Any, *, imgsz: tuple[int, int], max_det: int = 100, conf: float = 0.05, iou: float = 0.6
) -> Any:
    """Return a copy of the dense-contract ONNX model with NMS appended (see the module docstring).

    Args:
        model: ONNX ModelProto with float32 outputs `boxes` [B, N, 4] and `scores` [B, N, C].
        imgsz: (H, W) network input; boxes are clipped to it before NMS.
        max_det: detections kept per image (the padded length).
        conf: score threshold (scores <= conf are dropped).
        iou: IoU threshold (a box overlapping a higher-scored one of its class by more is dropped).

    Raises:
        ValueError: bad thresholds, or a model without the dense contract outputs.
    """
    import onnx

    _validate(max_det, conf, iou)
    names = [o.name for o in model.graph.output]
    if names != list(OUTPUT_NAMES):
        raise ValueError(f"append_nms: expected outputs {list(OUTPUT_NAMES)}, got {names}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = _Graph(out.graph)
    _constants(g, imgsz=imgsz, max_det=max_det, conf=conf, iou=iou)
    _select(g)
    _top_per_image(g)
    _outputs(g, max_det)
    onnx.checker.check_model(out)
    return out


def nms_settings(mode: str, *, max_det: int, conf: float, iou: float) -> dict[str, Any]:
    """The manifest's "nms" entry."""
    if mode == "none":
        return {"mode": "none"}
    return {
        "mode": mode,
        "op": "NonMaxSuppression (ONNX standard, class-aware)",
        "max_det": int(max_det),
        "conf": float(conf),
        "iou": float(iou),
        "outputs": list(NMS_OUTPUT_NAMES),
        "padding": {"det_boxes": 0.0, "det_scores": 0.0, "det_classes": -1},
    }
