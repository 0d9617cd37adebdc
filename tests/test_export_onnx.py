"""PyTorch -> ONNX export: the contract, fp32 parity on real images, manifest and metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from _export_fixtures import coco128, make_checkpoint  # noqa: E402

from pgd_deploy.export.deploy_model import INPUT_NAME, OPSET, OUTPUT_NAMES, check_imgsz  # noqa: E402
from pgd_deploy.export.images import ImageSet  # noqa: E402
from pgd_deploy.export.parity import compare  # noqa: E402
from pgd_deploy.export.to_onnx import export_checkpoint_onnx  # noqa: E402
from pgd_deploy.runtime.backends import ONNX_METADATA_KEY, OrtBackend, load_backend  # noqa: E402
from pgd_deploy.runtime.manifest import manifest_path, read_manifest  # noqa: E402

IMGSZ = (96, 128)
FP32_ATOL = {"boxes": 1e-3, "scores": 1e-4}  # the fp32 gate's defaults


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    root = tmp_path_factory.mktemp("r18")
    ckpt = make_checkpoint(root / "r18.pt", depth=18)
    onnx_path = export_checkpoint_onnx(ckpt, root / "r18.onnx", imgsz=IMGSZ, batch=(1, 2, 4))
    return ckpt, onnx_path


def _coco_batches(backend, count=6, batch=3):
    folder = coco128()
    images = ImageSet(source=str(folder), paths=sorted(folder.glob("*.jpg"))[:count])
    return [b for b, _ in images.batches(backend.input_size, batch)]


def test_contract_io_names_opset_and_dynamic_batch(r18):
    import onnx

    _, path = r18
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == [INPUT_NAME]
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {OPSET}
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, *IMGSZ]
    backend = OrtBackend(path)
    for batch in (1, 3):  # traced at batch 1, runs at any batch
        out = backend.infer(np.zeros((batch, 3, *IMGSZ), np.float32))
        assert out["boxes"].shape == (batch, sum(backend.level_sizes), 4)
        assert out["scores"].shape == (batch, sum(backend.level_sizes), 3)
        assert out["boxes"].dtype == np.float32


def test_r18_fp32_parity_on_coco128(r18):
    ckpt, path = r18
    reference = load_backend(ckpt, input_size=IMGSZ)
    candidate = load_backend(path)
    report = compare(reference, candidate, _coco_batches(candidate), atol=FP32_ATOL)
    assert report.images == 6
    assert report.passed, report.summary()
    assert report.outputs["scores"].max_abs < 1e-5  # far inside the gate, as measured


@pytest.mark.slow
def test_r50_fp32_parity_on_coco128(tmp_path):
    ckpt = make_checkpoint(tmp_path / "r50.pt", depth=50)
    path = export_checkpoint_onnx(ckpt, tmp_path / "r50.onnx", imgsz=IMGSZ, simplify=False)
    reference = load_backend(ckpt, input_size=IMGSZ)
    candidate = load_backend(path)
    report = compare(
        reference, candidate, _coco_batches(candidate, count=4, batch=2), atol=FP32_ATOL
    )
    assert report.passed, report.summary()


def test_manifest_and_metadata_let_load_backend_work(r18):
    _, path = r18
    manifest = read_manifest(path)
    assert manifest_path(path).name == "r18.manifest.json"
    for key in (
        "imgsz",
        "level_sizes",
        "class_names",
        "category_ids",
        "postprocess",
        "precision",
        "format",
        "batch",
        "status",
        "inputs",
        "outputs",
        "preprocess",
        "nms",
        "source",
    ):
        assert key in manifest, key
    assert manifest["imgsz"] == list(IMGSZ)
    assert manifest["format"] == "onnx" and manifest["precision"] == "fp32"
    assert manifest["status"] == "unchecked"  # export_checkpoint_onnx runs no gates
    assert manifest["batch"] == {"min": 1, "opt": 2, "max": 4}
    assert manifest["class_names"] == ["circle", "square", "triangle"]
    assert sum(manifest["level_sizes"]) == manifest["outputs"][0]["shape"][1]
    assert len(manifest["source"]["sha256"]) == 64
    assert manifest["source"]["train_config"]["model"]["depth"] == 18
    backend = load_backend(path)
    assert backend.input_size == IMGSZ and backend.class_names == manifest["class_names"]
    assert backend.max_batch == 4


def test_onnx_metadata_is_a_fallback_without_the_manifest(r18, tmp_path):
    import onnx

    _, path = r18
    model = onnx.load(str(path))
    meta = json.loads({p.key: p.value for p in model.metadata_props}[ONNX_METADATA_KEY])
    assert meta["imgsz"] == list(IMGSZ) and meta["level_sizes"]
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(path.read_bytes())  # no manifest beside it
    backend = load_backend(lonely)
    assert backend.level_sizes == meta["level_sizes"]
    assert backend.postprocess_kwargs["score_thresh"] == pytest.approx(0.05)


@pytest.mark.parametrize(
    "size, message",
    [((100, 128), "multiples of 32"), ((96,), "expected HxW"), ((0, 64), "expected HxW")],
)
def test_imgsz_validation_names_the_flag(size, message):
    with pytest.raises(ValueError, match="--imgsz") as err:
        check_imgsz(size)
    assert message in str(err.value)


def test_exporter_choice(r18):
    import importlib.util

    from pgd_deploy.export.source import load_source
    from pgd_deploy.export.to_onnx import export_onnx

    detector = load_source(r18[0]).detector
    with pytest.raises(ValueError, match="--exporter"):
        export_onnx(detector, imgsz=(64, 64), exporter="jit")
    if importlib.util.find_spec("onnxscript") is None:
        with pytest.raises(ImportError, match="onnxscript"):
            export_onnx(detector, imgsz=(64, 64), exporter="dynamo")
