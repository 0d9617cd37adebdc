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


@pytest.mark.parametrize("topk", [1200, 12])  # all N * C candidates; a cut below max_det
def test_padded_outputs_match_numpy_postprocessing(topk):
    """The graph equals the host post-processing with the same pre-NMS top-k over one level."""
    rng = np.random.default_rng(0)
    n, c, max_det, conf, iou = 300, 4, 20, 0.2, 0.5
    model = append_nms(
        _identity_model(n, c), imgsz=(H, W), max_det=max_det, conf=conf, iou=iou, topk=topk
    )
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
            topk_candidates=topk,
            max_det=max_det,
            level_sizes=None,
        )
        k = int(num[i, 0])
        assert k == len(ref)
        np.testing.assert_allclose(det_scores[i, :k], ref.scores, rtol=1e-6)
        np.testing.assert_array_equal(det_classes[i, :k], ref.labels)
        np.testing.assert_allclose(det_boxes[i, :k], ref.boxes, atol=1e-4)
        assert (det_classes[i, k:] == -1).all() and (det_scores[i, k:] == 0).all()
        assert (det_boxes[i, k:] == 0).all()
    assert num[1, 0] == 0 and num[0, 0] == min(max_det, topk)  # empty image and a full one


def test_pre_nms_topk_bounds_the_candidates():
    """With K = 5 only the 5 best (location, class) pairs can survive: TensorRT's NMS layer never
    sees more candidates than the graph's TopK hands it."""
    rng = np.random.default_rng(1)
    model = append_nms(_identity_model(50, 3), imgsz=(H, W), max_det=40, conf=0.0, topk=5)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    xy = rng.uniform(0, 40, size=(1, 50, 2))
    boxes = np.concatenate([xy, xy + 1.0], axis=-1).astype(np.float32)  # tiny: no overlaps
    scores = rng.uniform(0.1, 1, size=(1, 50, 3)).astype(np.float32)
    num, _, det_scores, _ = session.run(None, {"b": boxes, "s": scores})
    assert num[0, 0] == 5
    np.testing.assert_allclose(det_scores[0, :5], np.sort(scores.reshape(-1))[::-1][:5])
    topk = [n for n in model.graph.node if n.op_type == "TopK"]
    ks = [
        int(i.int64_data[0] if i.int64_data else np.frombuffer(i.raw_data, np.int64)[0])
        for i in model.graph.initializer
        if i.name in {t.input[1] for t in topk}
    ]
    assert sorted(ks) == [5, 40] and max(ks) < 3840  # onnx-tensorrt: TopK K < 3840


def test_nms_refuses_bad_thresholds_and_graphs():
    model = _identity_model(10, 2)
    with pytest.raises(ValueError, match="--max-det"):
        append_nms(model, imgsz=(H, W), max_det=3840)  # TensorRT TopK needs K < 3840
    with pytest.raises(ValueError, match="--nms-topk.*5000"):
        append_nms(model, imgsz=(H, W), topk=3840)
    with pytest.raises(ValueError, match="--iou"):
        append_nms(model, imgsz=(H, W), iou=0.0)
    append_nms(model, imgsz=(H, W), max_det=3839, topk=3839)  # the largest accepted
    model.graph.output[1].type.tensor_type.shape.dim[2].dim_param = "C"  # symbolic classes
    with pytest.raises(ValueError, match="fixed N and C"):
        append_nms(model, imgsz=(H, W))
    model.graph.output[0].name = "other"
    with pytest.raises(ValueError, match="expected outputs"):
        append_nms(model, imgsz=(H, W))
    settings = nms_settings("onnx", max_det=7, conf=0.1, iou=0.5, topk=1000, candidates=20)
    assert settings["max_det"] == 7 and settings["pre_nms_topk"] == 20  # capped at N * C
    assert nms_settings("none", max_det=7, conf=0.1, iou=0.5) == {"mode": "none"}


def test_in_graph_nms_matches_torch_postprocessing_on_coco128(tmp_path):
    """A detector with live scores (cls bias 0): the exported NMS finds the torch detections."""
    from pgd_deploy.export.images import ImageSet
    from pgd_deploy.export.source import load_source
    from pgd_deploy.export.to_onnx import export_onnx, save_onnx
    from pgd_deploy.runtime.backends import OrtBackend
    from pgd_deploy.runtime.torch_backend import TorchBackend

    folder = coco128()
    from PIL import Image

    src = load_source(make_checkpoint(tmp_path / "live.pt", cls_bias=0.0, box_bias=1.5))
    post = {"score_thresh": 0.2, "nms_thresh": 0.6, "max_det": 50}
    src.detector.postprocess_kwargs.update(post)
    reference = TorchBackend.from_detector(
        src.detector, input_size=(H, W), class_names=src.class_names
    )
    dense = export_onnx(src.detector, imgsz=(H, W), simplify=False)
    model = append_nms(dense, imgsz=(H, W), max_det=50, conf=0.2, iou=0.6, topk=1000)
    path = save_onnx(model, tmp_path / "nms.onnx")
    meta = {"imgsz": [H, W], "postprocess": post, "class_names": src.class_names}
    candidate = OrtBackend(path, meta=meta)
    assert candidate.in_graph_nms
    # Images that fill the letterbox: the in-graph NMS clips boxes to the input canvas, the host
    # post-processing to the image inside it (documented in export/nms.py); here they coincide.
    paths = [p for p in sorted(folder.glob("*.jpg")) if Image.open(p).size == (640, 480)]
    images = ImageSet(source="coco128", paths=paths[:4])
    ref_dets, cand_dets = [], []
    same_candidates = {"topk_candidates": 1000, "level_sizes": None}  # as in the graph
    for batch, transforms in images.batches((H, W), 2):
        ref_dets += reference.postprocess(reference.infer(batch), transforms, **same_candidates)
        cand_dets += candidate.postprocess(candidate.infer(batch), transforms)
    total = sum(len(d) for d in ref_dets)
    assert total >= 20, "the test needs detections to be meaningful"
    agreement = detection_agreement(ref_dets, cand_dets, iou_thresh=0.9, score_thresh=0.2)
    assert agreement >= 0.95
    assert abs(total - sum(len(d) for d in cand_dets)) <= 0.05 * total


@pytest.mark.parametrize("conf, height", [(0.05, 64), (0.005, 24)])
def test_gate_compares_in_graph_nms_with_the_same_candidates(tmp_path, conf, height):
    """The agreement gate of an in-graph NMS model makes the reference select its NMS candidates
    as the graph does (top --nms-topk over all levels), not with the host's per-level top-k:
    with a cut that matters (K = 40 of 258 pairs) both sides then find the same detections.
    Also with wide images (64 x 24, letterboxed) and conf 0.005, issue 39's failing case: the
    export agrees with its reference and passes its fp32 gate (zero-area boxes: see
    test_runtime_postprocess)."""
    from pgd_deploy.config import GatesConfig
    from pgd_deploy.export.gates import run_gates
    from pgd_deploy.export.images import ImageSet
    from pgd_deploy.export.source import load_source
    from pgd_deploy.export.to_onnx import export_onnx, save_onnx
    from pgd_deploy.runtime.backends import OrtBackend
    from pgd_deploy.runtime.torch_backend import TorchBackend

    size, k = (64, 64), 40
    src = load_source(make_checkpoint(tmp_path / "live.pt", cls_bias=0.0, box_bias=1.0))
    post = {"score_thresh": conf, "nms_thresh": 0.6, "max_det": 100}
    src.detector.postprocess_kwargs.update(post)
    reference = TorchBackend.from_detector(
        src.detector, input_size=size, class_names=src.class_names
    )
    dense = export_onnx(src.detector, imgsz=size, simplify=False)
    meta = {
        "imgsz": list(size),
        "class_names": src.class_names,
        "postprocess": post,
        "level_sizes": reference.level_sizes,
        "nms": nms_settings("onnx", max_det=100, conf=conf, iou=0.6, topk=k, candidates=258),
    }
    nms_model = append_nms(dense, imgsz=size, max_det=100, conf=conf, iou=0.6, topk=k)
    candidate = OrtBackend(save_onnx(nms_model, tmp_path / "nms.onnx"), meta=meta)
    twin = OrtBackend(save_onnx(dense, tmp_path / "dense.onnx"), meta=meta)
    rng = np.random.default_rng(0)
    images = ImageSet(
        source="noise",
        arrays=[rng.integers(0, 255, (height, 64, 3), np.uint8) for _ in range(4)],
    )
    report = run_gates(
        reference,
        candidate,
        images,
        precision="fp32",
        gates=GatesConfig(),
        imgsz=size,
        batch_size=2,
        dense_candidate=twin,
    )
    agreement = next(r for r in report.results if r.name == "agreement")
    assert agreement.detail["reference_postprocess"]["topk_candidates"] == k
    assert agreement.detail["reference_detections"] >= 30  # the cut removes real candidates
    assert agreement.detail["agreement"] == 1.0 and report.passed
    if height == 64:  # (with padding the host clips to the content before NMS, the graph after)
        assert agreement.detail["reverse_agreement"] == 1.0
    with pytest.raises(ValueError, match="no dense tensors"):  # NMS outputs alone: said clearly
        run_gates(
            reference,
            candidate,
            images,
            precision="fp32",
            gates=GatesConfig(),
            imgsz=size,
            batch_size=2,
        )


def test_the_in_graph_thresholds_reach_the_reference_without_changing_the_detector():
    import torch

    from pgd_deploy.config import ExportConfig, ModelConfig
    from pgd_deploy.export.pipeline import export_postprocess
    from pgd_deploy.models import build_detector
    from pgd_deploy.runtime.torch_backend import TorchBackend

    torch.manual_seed(0)
    detector = build_detector(ModelConfig(depth=18, num_classes=3, fpn_channels=64, head_convs=1))
    own = dict(detector.postprocess_kwargs)
    cfg = ExportConfig(nms="onnx", conf=0.3, iou=0.45, max_det=50)
    post = export_postprocess(detector.postprocess_kwargs, cfg)
    assert post == {**own, "score_thresh": 0.3, "nms_thresh": 0.45, "max_det": 50}
    assert export_postprocess(detector.postprocess_kwargs, ExportConfig(nms="none")) == own
    reference = TorchBackend.from_detector(
        detector, input_size=(64, 64), class_names=["a", "b", "c"], postprocess=post
    )
    assert reference.postprocess_kwargs == post
    # export used to write the in-graph thresholds into the detector itself
    assert detector.postprocess_kwargs == own
