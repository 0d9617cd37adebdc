"""The runtime backends behind `load_backend`: one interface for PyTorch, ONNX Runtime, TensorRT."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from _export_fixtures import coco128, make_checkpoint

from pgd_deploy.runtime.backends import Backend, load_backend
from pgd_deploy.runtime.preprocess import load_image

IMGSZ = (96, 128)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from pgd_deploy.export.to_onnx import export_checkpoint_onnx

    root = tmp_path_factory.mktemp("backends")
    ckpt = make_checkpoint(root / "live.pt", cls_bias=-0.5, box_bias=1.5)
    onnx_path = export_checkpoint_onnx(ckpt, root / "live.onnx", imgsz=IMGSZ, simplify=False)
    return ckpt, onnx_path


def test_runtime_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import pgd_deploy.runtime.backends, pgd_deploy.runtime.trt_backend\n"
        "import pgd_deploy.runtime.manifest, pgd_deploy.export.manifest\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_torch_and_onnx_backends_predict_the_same_detections(artifacts):
    from pgd_deploy.runtime.agreement import detection_agreement

    ckpt, onnx_path = artifacts
    images = [load_image(p) for p in sorted(coco128().glob("*.jpg"))[:3]]
    torch_backend = load_backend(ckpt, input_size=IMGSZ)
    ort_backend = load_backend(onnx_path)
    assert torch_backend.name == "torch" and ort_backend.name == "onnxruntime"
    assert ort_backend.input_size == torch_backend.input_size == IMGSZ
    assert ort_backend.level_sizes == torch_backend.level_sizes
    ref, got = torch_backend.predict(images), ort_backend.predict(images)
    assert sum(len(d) for d in ref) > 10
    # Random weights give many near-tied scores, so the max_det cut can differ at the margin.
    assert detection_agreement(ref, got, iou_thresh=0.9) >= 0.95
    for r, g, image in zip(ref, got, images):
        np.testing.assert_allclose(r.scores[:10], g.scores[:10], atol=1e-5)
        h, w = image.shape[:2]  # detections are in original-image pixels
        assert g.boxes[:, 2].max() <= w and g.boxes[:, 3].max() <= h


def test_backend_interface_pieces(artifacts):
    _, onnx_path = artifacts
    backend = load_backend(onnx_path)
    image = np.zeros((50, 70, 3), np.uint8)
    batch, transforms = backend.preprocess([image, image])
    assert batch.shape == (2, 3, *IMGSZ) and batch.dtype == np.float32
    outputs = backend.infer(batch)
    dets = backend.postprocess(outputs, transforms, score_thresh=0.99)
    assert len(dets) == 2 and all(len(d) == 0 for d in dets)
    assert backend.describe() == "onnxruntime (CPUExecutionProvider) fp32 96x128"
    assert backend.max_batch == 8 and not backend.in_graph_nms


def test_in_graph_nms_outputs_are_post_processed(artifacts, tmp_path):
    import onnx

    from pgd_deploy.export.manifest import describe_io
    from pgd_deploy.export.nms import append_nms
    from pgd_deploy.runtime.manifest import read_manifest, write_manifest

    ckpt, onnx_path = artifacts
    model = append_nms(onnx.load(str(onnx_path)), imgsz=IMGSZ, max_det=20, conf=0.05, iou=0.6)
    path = tmp_path / "nms.onnx"
    path.write_bytes(model.SerializeToString())
    write_manifest(path, {**read_manifest(onnx_path), "outputs": describe_io(model)[1]})
    backend = load_backend(path)
    assert backend.in_graph_nms
    image = load_image(sorted(coco128().glob("*.jpg"))[0])
    dets = backend.predict([image])[0]
    assert 0 < len(dets) <= 20
    assert (np.diff(dets.scores) <= 0).all()
    assert dets.boxes[:, 2].max() <= image.shape[1]


def test_unknown_extension_and_missing_files():
    with pytest.raises(ValueError, match="unknown artifact type '.bin'"):
        load_backend("model.bin")
    pytest.importorskip("onnxruntime")
    with pytest.raises(FileNotFoundError, match="ONNX model not found"):
        load_backend("/nonexistent/model.onnx")


def test_corrupt_onnx_is_a_value_error(tmp_path):
    pytest.importorskip("onnxruntime")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="ONNX Runtime cannot load"):
        load_backend(bad)


def test_base_backend_defaults_category_ids_from_class_names():
    backend = Backend({"imgsz": [32, 32], "class_names": ["a", "b"]})
    assert backend.category_ids == [1, 2]
    assert backend.postprocess_kwargs == {
        "score_thresh": 0.05,
        "nms_thresh": 0.6,
        "topk_candidates": 1000,
        "max_det": 100,
    }
    with pytest.raises(NotImplementedError):
        backend.infer(np.zeros((1, 3, 32, 32), np.float32))


def test_torch_backend_from_detector_shares_the_model(artifacts):
    from pgd_deploy.export.source import load_source
    from pgd_deploy.runtime.torch_backend import TorchBackend

    ckpt, _ = artifacts
    src = load_source(ckpt)
    backend = TorchBackend.from_detector(
        src.detector, input_size=IMGSZ, class_names=src.class_names
    )
    assert backend.model is src.detector and backend.path is None
    assert backend.category_ids == [1, 2, 3]
    assert backend.infer(np.zeros((1, 3, *IMGSZ), np.float32))["scores"].shape[-1] == 3
