"""In-graph NMS (`--nms onnx`): standard NonMaxSuppression, padded outputs, same detections."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from _export_fixtures import coco128, make_checkpoint  # noqa: E402

from pgd_deploy.export.nms import append_nms, nms_settings  # noqa: E402
from pgd_deploy.runtime.agreement import detection_agreement  # noqa: E402
from pgd_deploy.runtime.postprocess import postprocess  # noqa: E402

H, W = 96, 128  # 3:4, like the 640x480 coco128 images used below


def _identity_model(num_locations: int, num_classes: int):
    """An ONNX graph whose dense outputs are its inputs: NMS tested in isolation."""
    from onnx import TensorProto, helper

    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["b"], ["boxes"]),
            helper.make_node("Identity", ["s"], ["scores"]),
        ],
        "dense",
        [
            helper.make_tensor_value_info("b", f32, ["batch", num_locations, 4]),
            helper.make_tensor_value_info("s", f32, ["batch", num_locations, num_classes]),
        ],
        [
            helper.make_tensor_value_info("boxes", f32, ["batch", num_locations, 4]),
            helper.make_tensor_value_info("scores", f32, ["batch", num_locations, num_classes]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _random_dets(rng, batch, n, c):
    xy = rng.uniform(-10, [W, H], size=(batch, n, 2))
    wh = rng.uniform(4, 40, size=(batch, n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)
    scores = rng.uniform(0, 1, size=(batch, n, c)).astype(np.float32) ** 3
    return boxes, scores


def test_padded_outputs_match_numpy_postprocessing():
    rng = np.random.default_rng(0)
    n, c, max_det, conf, iou = 300, 4, 20, 0.2, 0.5
    model = append_nms(_identity_model(n, c), imgsz=(H, W), max_det=max_det, conf=conf, iou=iou)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    boxes, scores = _random_dets(rng, 3, n, c)
    scores[1] *= 0.1  # image 1: nothing above the threshold
    num, det_boxes, det_scores, det_classes = session.run(None, {"b": boxes, "s": scores})
    assert num.shape == (3, 1) and num.dtype == np.int32
    assert det_boxes.shape == (3, max_det, 4) and det_classes.dtype == np.int32
    clipped = boxes.copy()
    clipped[..., 0::2] = clipped[..., 0::2].clip(0, W)
    clipped[..., 1::2] = clipped[..., 1::2].clip(0, H)
    for i in range(3):
        ref = postprocess(
            clipped[i],
            scores[i],
            score_thresh=conf,
            nms_thresh=iou,
            topk_candidates=n * c,
            max_det=max_det,
        )
        k = int(num[i, 0])
        assert k == len(ref)
        np.testing.assert_allclose(det_scores[i, :k], ref.scores, rtol=1e-6)
        np.testing.assert_array_equal(det_classes[i, :k], ref.labels)
        np.testing.assert_allclose(det_boxes[i, :k], ref.boxes, atol=1e-4)
        assert (det_classes[i, k:] == -1).all() and (det_scores[i, k:] == 0).all()
        assert (det_boxes[i, k:] == 0).all()
    assert num[1, 0] == 0 and num[0, 0] == max_det  # empty image and a full one


def test_nms_refuses_bad_thresholds_and_graphs():
    model = _identity_model(10, 2)
    with pytest.raises(ValueError, match="--max-det"):
        append_nms(model, imgsz=(H, W), max_det=5000)
    with pytest.raises(ValueError, match="--iou"):
        append_nms(model, imgsz=(H, W), iou=0.0)
    model.graph.output[0].name = "other"
    with pytest.raises(ValueError, match="expected outputs"):
        append_nms(model, imgsz=(H, W))
    assert nms_settings("onnx", max_det=7, conf=0.1, iou=0.5)["max_det"] == 7
    assert nms_settings("none", max_det=7, conf=0.1, iou=0.5) == {"mode": "none"}


def test_in_graph_nms_matches_torch_postprocessing_on_coco128(tmp_path):
    """A detector with live scores (cls bias 0): the exported NMS finds the torch detections."""
    from pgd_deploy.export.images import ImageSet
    from pgd_deploy.export.source import load_source
    from pgd_deploy.export.to_onnx import export_onnx, save_onnx
    from pgd_deploy.runtime.backends import OrtBackend, TorchBackend

    folder = coco128()
    from PIL import Image

    src = load_source(make_checkpoint(tmp_path / "live.pt", cls_bias=0.0, box_bias=1.5))
    post = {"score_thresh": 0.2, "nms_thresh": 0.6, "max_det": 50}
    src.detector.postprocess_kwargs.update(post)
    reference = TorchBackend.from_detector(
        src.detector, input_size=(H, W), class_names=src.class_names
    )
    dense = export_onnx(src.detector, imgsz=(H, W), simplify=False)
    model = append_nms(dense, imgsz=(H, W), max_det=50, conf=0.2, iou=0.6)
    path = save_onnx(model, tmp_path / "nms.onnx")
    candidate = OrtBackend(path, meta={"imgsz": [H, W], "postprocess": post})
    assert candidate.in_graph_nms
    # Images that fill the letterbox: the in-graph NMS clips boxes to the input canvas, the host
    # post-processing to the image inside it (documented in export/nms.py); here they coincide.
    paths = [p for p in sorted(folder.glob("*.jpg")) if Image.open(p).size == (640, 480)]
    images = ImageSet(source="coco128", paths=paths[:4])
    ref_dets, cand_dets = [], []
    for batch, transforms in images.batches((H, W), 2):
        ref_dets += reference.postprocess(reference.infer(batch), transforms)
        cand_dets += candidate.postprocess(candidate.infer(batch), transforms)
    total = sum(len(d) for d in ref_dets)
    assert total >= 20, "the test needs detections to be meaningful"
    agreement = detection_agreement(ref_dets, cand_dets, iou_thresh=0.9, score_thresh=0.2)
    assert agreement >= 0.95
    assert abs(total - sum(len(d) for d in cand_dets)) <= 0.05 * total
