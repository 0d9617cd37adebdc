"""ONNX models not made by pgd-export are refused on load, naming the file and what differs
(issue 13, item 6): they used to crash `pgd-serve predict` and the demo with IndexError, KeyError
or "invalid literal for int() with base 10: 'H'"."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from pgd_deploy.runtime.backends import ONNX_METADATA_KEY, load_backend  # noqa: E402
from pgd_deploy.runtime.contract import (  # noqa: E402
    check_output_shapes,
)
from pgd_deploy.runtime.manifest import write_manifest  # noqa: E402
from pgd_deploy.runtime.verify import UnverifiedArtifactError  # noqa: E402

N, C = 12, 3
META = {
    "imgsz": [32, 32],
    "class_names": ["a", "b", "c"],
    "level_sizes": [8, 4],
    "batch": {"min": 1, "opt": 1, "max": 4},
}


def _model(
    path: Path,
    *,
    input_name: str = "images",
    input_dims=("batch", 3, 32, 32),
    outputs=(("boxes", ("batch", N, 4)), ("scores", ("batch", N, C))),
    meta: dict | None = None,
    manifest: dict | None = None,
) -> Path:
    """A tiny graph with the given I/O: every output is a constant broadcast over the batch."""
    f32 = TensorProto.FLOAT
    nodes, inits = [], []
    for i, (name, dims) in enumerate(outputs):
        fixed_dims = [d if isinstance(d, int) else 2 for d in dims[1:]]
        value = np.full([1, *fixed_dims], 0.5, np.float32)
        inits.append(onnx.numpy_helper.from_array(value, f"c{i}"))
        nodes += [
            helper.make_node("ReduceMean", [input_name], [f"m{i}"], keepdims=0, axes=[1, 2, 3]),
            helper.make_node("Reshape", [f"m{i}", f"shape{i}"], [f"col{i}"]),
            helper.make_node("Mul", [f"col{i}", f"c{i}"], [name]),
        ]
        col_shape = np.array([-1] + [1] * len(fixed_dims), np.int64)
        inits.append(onnx.numpy_helper.from_array(col_shape, f"shape{i}"))
    graph = helper.make_graph(
        nodes,
        "foreign",
        [helper.make_tensor_value_info(input_name, f32, list(input_dims))],
        [helper.make_tensor_value_info(n, f32, list(d)) for n, d in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    if meta is not None:
        model.metadata_props.add(key=ONNX_METADATA_KEY, value=json.dumps(meta))
    path.write_bytes(model.SerializeToString())
    if manifest is not None:
        write_manifest(path, manifest)
    return path


def test_a_model_that_follows_the_contract_loads_and_runs(tmp_path):
    backend = load_backend(_model(tmp_path / "ok.onnx", manifest=META))
    dets = backend.predict([np.zeros((20, 30, 3), np.uint8)])
    assert len(dets) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        # a torchvision-style export: symbolic H, W and no metadata ("invalid literal ... 'H'")
        (
            {"input_dims": ("batch", 3, "H", "W")},
            "no pgd-export metadata .*manifest.json.*'pgd_deploy'",
        ),
        (
            {"input_name": "input", "manifest": META},
            r"expected one input 'images' \[B, 3, H, W\], the model has 'input' \[\?, 3, 32, 32\]",
        ),
        (
            {"input_dims": ("batch", 1, 32, 32), "manifest": META},
            r"input 'images' is \[\?, 1, 32, 32\], expected \[B, 3, H, W\]",
        ),
        (
            {"input_dims": ("batch", 3, 64, 64), "manifest": META},
            r"input 'images' is \[\?, 3, 64, 64\] but the metadata says imgsz 32x32",
        ),
        (  # KeyError 'boxes' in post-processing
            {"outputs": (("logits", ("batch", N, C)),), "manifest": META},
            r"outputs \['logits'\] are neither the dense contract",
        ),
        (  # IndexError in drawing: more classes than names
            {
                "outputs": (("boxes", ("batch", N, 4)), ("scores", ("batch", N, 5))),
                "manifest": META,
            },
            "'scores' has 5 classes but the metadata names 3",
        ),
        (
            {"manifest": {**META, "level_sizes": [8, 8]}},
            "the model has 12 locations but the metadata's level_sizes sum to 16",
        ),
        (
            {
                "outputs": (("boxes", ("batch", N, 5)), ("scores", ("batch", N, C))),
                "manifest": META,
            },
            r"output 'boxes' is \[\?, 12, 5\], expected \[B, N, 4\]",
        ),
        ({"manifest": {**META, "class_names": []}}, "metadata 'class_names' is \\[\\]"),
        ({"manifest": {k: v for k, v in META.items() if k != "imgsz"}}, "metadata 'imgsz'"),
        ({"meta": {**META, "imgsz": ["H", "W"]}}, r"metadata 'imgsz' is \['H', 'W'\]"),
        (
            {"manifest": {**META, "category_ids": [1, 2]}},
            "'category_ids' has 2 entries, expected one per class name",
        ),
        (
            {
                "outputs": (
                    ("num_dets", ("batch", 1)),
                    ("det_boxes", ("batch", 10, 4)),
                    ("det_scores", ("batch", 10)),
                    ("det_classes", ("batch", 10, 1)),
                ),
                "manifest": META,
            },
            r"output 'det_classes' is \[\?, 10, 1\], expected \[B, max_det\]",
        ),
    ],
)
def test_foreign_models_are_refused_naming_the_file(tmp_path, kwargs, message):
    path = _model(tmp_path / "foreign.onnx", **kwargs)
    with pytest.raises(ValueError, match=message) as err:
        load_backend(path)
    assert str(err.value).startswith(f"{path}: ")


def test_in_graph_nms_contract_is_accepted(tmp_path):
    outputs = (
        ("num_dets", ("batch", 1)),
        ("det_boxes", ("batch", 10, 4)),
        ("det_scores", ("batch", 10)),
        ("det_classes", ("batch", 10)),
    )
    backend = load_backend(_model(tmp_path / "nms.onnx", outputs=outputs, meta=META))
    assert backend.in_graph_nms


def test_outputs_that_differ_from_their_declared_dims_are_refused(tmp_path):
    """A graph that declares scores [B, 12, 3] but computes [B, 12, 2] (an edited model): ONNX
    Runtime's shape inference reports what the graph computes, so it is refused on load; what
    inference cannot see is caught on the first inference (`check_output_shapes`)."""
    path = _model(tmp_path / "liar.onnx", manifest=META)
    model = onnx.load(str(path))
    model.graph.initializer[2].CopyFrom(
        onnx.numpy_helper.from_array(np.full([1, N, 2], 0.5, np.float32), "c1")
    )
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ValueError, match="'scores' has 2 classes but the metadata names 3"):
        load_backend(path)
    declared = {"scores": ["batch", N, C]}
    check_output_shapes(path, declared, {"scores": np.zeros((2, N, C))})
    with pytest.raises(ValueError, match=r"liar.onnx: output 'scores' came out \[2, 12, 2\]"):
        check_output_shapes(path, declared, {"scores": np.zeros((2, N, 2))})


def test_predict_refuses_a_foreign_model_with_exit_2(tmp_path, capsys):
    from pgd_deploy.serve.command import main

    path = _model(tmp_path / "tv.onnx", input_dims=("batch", 3, "H", "W"))
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (40, 30)).save(images / "a.png")
    argv = ["predict", "--model", str(path), "--source", str(images), "--out", str(tmp_path / "o")]
    assert main(argv) == 2  # no manifest: refused before it is opened (runtime.verify)
    err = capsys.readouterr().err
    assert f"{path}: not served, it is not verified: no manifest" in err
    assert main([*argv, "--allow-unverified"]) == 2  # opened, then refused by the contract
    err = capsys.readouterr().err
    assert str(path) in err and "no pgd-export metadata" in err
    assert "invalid literal" not in err and "Traceback" not in err


def test_demo_refuses_a_foreign_model(tmp_path):
    pytest.importorskip("gradio")
    from pgd_deploy.serve.gradio_app import open_app

    good = _model(tmp_path / "good.onnx", manifest=META)
    bad = _model(tmp_path / "bad.onnx", manifest={**META, "class_names": ["a"]})
    with pytest.raises(ValueError, match=f"{good}: not served.*status None"):
        open_app(good, bad, device="cpu")  # hand-written manifests vouch for nothing
    with pytest.raises(ValueError, match=f"{bad}: 'scores' has 3 classes"):
        open_app(good, bad, device="cpu", allow_unverified=True)


def test_plan_io_is_checked_with_the_same_rules(tmp_path, monkeypatch):
    """The TensorRT runner passes the engine's I/O through the same check (here the engine is the
    test stand-in: ONNX Runtime on the plan bytes)."""
    import _trt_standin

    _trt_standin.install(monkeypatch)
    profile = {"min": [1, 3, 32, 32], "opt": [1, 3, 32, 32], "max": [4, 3, 32, 32]}
    manifest = {**META, "tensorrt": {"version": "10.0.0.0", "profile": profile}}
    plan = _model(tmp_path / "yolo.onnx", outputs=(("output0", ("batch", 7, 84)),))
    plan = plan.rename(tmp_path / "yolo.plan")
    write_manifest(plan, manifest)
    with pytest.raises(ValueError, match=rf"{plan}: outputs \['output0'\] are neither"):
        load_backend(plan)
    good = _model(tmp_path / "good.onnx").rename(tmp_path / "good.plan")
    write_manifest(good, manifest)
    assert load_backend(good).name == "tensorrt"
    write_manifest(good, {**manifest, "class_names": ["a"]})
    with pytest.raises(ValueError, match="'scores' has 3 classes but the metadata names 1"):
        load_backend(good)
    # the manifest's own I/O must be the engine's (runtime.verify, check 4)
    boxes = {"name": "boxes", "dtype": "float32", "shape": [-1, N, 4]}
    scores = {"name": "scores", "dtype": "float32", "shape": [-1, N + 1, C]}
    write_manifest(good, {**manifest, "outputs": [boxes, scores]})
    message = rf"{good}: not served.*gives output 'scores' the shape \[-1, 13, 3\] but the model"
    with pytest.raises(UnverifiedArtifactError, match=message):
        load_backend(good)
    backend = load_backend(good, allow_unverified=True)
    assert len(backend.warnings) == 1 and "'scores' the shape" in backend.warnings[0]
