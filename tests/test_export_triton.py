"""Triton model repository: layout, explicit fixed tensors, README, and the strict config parser.

Every generated config.pbtxt is also parsed with Triton's own schema (`inference.ModelConfig` from
tritonclient, `google.protobuf.text_format`, strict): `_triton_schema`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _triton_schema import dims, parse_model_config, read_model_config

from pgd_deploy.export.triton import (
    MANIFEST_PARAMETER,
    PbtxtError,
    container_tag,
    parse_pbtxt,
    read_repository_config,
    render_config,
    validate_config,
    write_repository,
)
from pgd_deploy.runtime.manifest import read_manifest
from pgd_deploy.runtime.verify import UnverifiedArtifactError


def _vouched(manifest, artifact):
    """`manifest` recording `artifact`'s sha256, as pgd-export's gates complete it."""
    from pgd_deploy.io_utils import file_sha256

    return {**manifest, "sha256": file_sha256(artifact)}


def _manifest(fmt="onnx", nms=False, trt=None, compatible=False, batch_min=1):
    if nms:
        outputs = [
            {"name": "num_dets", "dtype": "int32", "shape": [-1, 1]},
            {"name": "det_boxes", "dtype": "float32", "shape": [-1, 100, 4]},
            {"name": "det_scores", "dtype": "float32", "shape": [-1, 100]},
            {"name": "det_classes", "dtype": "int32", "shape": [-1, 100]},
        ]
    else:
        outputs = [
            {"name": "boxes", "dtype": "float32", "shape": [-1, 22400, 4]},
            {"name": "scores", "dtype": "float32", "shape": [-1, 22400, 80]},
        ]
    manifest = {
        "format": fmt,
        "precision": "fp16",
        "status": "passed",
        "imgsz": [800, 1344],
        "batch": {"min": batch_min, "opt": 8, "max": 16},
        "inputs": [{"name": "images", "dtype": "float32", "shape": [-1, 3, 800, 1344]}],
        "outputs": outputs,
        "preprocess": {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]},
        "source": {"checkpoint": "runs/student/best.pt"},
        "class_names": ['quote"d', "back\\slash"],  # escaping must survive the round trip
    }
    if trt:
        manifest["tensorrt"] = {
            "version": trt,
            "compute_capability": "8.9",
            "version_compatible": compatible,
        }
    return manifest


@pytest.mark.parametrize(
    "fmt, nms, filename", [("onnx", False, "model.onnx"), ("tensorrt", True, "model.plan")]
)
def test_repository_layout_parses_back_with_the_right_shapes(tmp_path, fmt, nms, filename):
    artifact = tmp_path / "artifact.bin"
    artifact.write_bytes(b"model bytes")
    manifest = _vouched(
        _manifest(fmt, nms, trt="10.3.0.26" if fmt == "tensorrt" else None), artifact
    )
    model_dir = write_repository(
        tmp_path / "repo", "student", artifact, manifest, max_batch_size=16, instances=2
    )
    assert (model_dir / "1" / filename).read_bytes() == b"model bytes"
    assert read_manifest(model_dir / "1" / filename)["format"] == fmt
    cfg = read_repository_config(model_dir)
    triton = read_model_config(model_dir)  # Triton's own schema, strict
    assert triton.name == "student" and triton.max_batch_size == 16
    assert all(d > 0 for shape in dims(triton, "output").values() for d in shape)
    assert cfg["name"] == "student" and cfg["max_batch_size"] == 16
    assert cfg["platform"] == ("tensorrt_plan" if fmt == "tensorrt" else "onnxruntime_onnx")
    inputs = {t["name"]: t for t in cfg["input"]}
    outputs = {t["name"]: t for t in cfg["output"]}
    assert inputs["images"]["dims"] == [3, 800, 1344]  # batch axis omitted (max_batch_size > 0)
    if nms:
        assert outputs["det_boxes"]["dims"] == [100, 4]
        assert outputs["num_dets"]["data_type"] == "TYPE_INT32"
    else:
        assert outputs["scores"]["dims"] == [22400, 80]
        assert outputs["boxes"]["data_type"] == "TYPE_FP32"
    assert cfg["instance_group"][0]["count"] == 2
    assert "dynamic_batching" in cfg
    params = {p["key"]: p["value"]["string_value"] for p in cfg["parameters"]}
    assert json.loads(params[MANIFEST_PARAMETER])["class_names"] == ['quote"d', "back\\slash"]
    readme = (tmp_path / "repo" / "README.md").read_text()
    assert "perf_analyzer -m student" in readme and "tritonserver --model-repository" in readme
    if fmt == "tensorrt":
        assert "nvcr.io/nvidia/tritonserver:24.08-py3" in readme and "10.3.0.26" in readme
        assert "version-compatible=true" not in readme


def test_container_tag_follows_the_tensorrt_version():
    assert container_tag("10.3.0.26") == ("nvcr.io/nvidia/tritonserver:24.08-py3", True)
    tag, known = container_tag("11.4.0")  # newer than the table (tensorrt>=10.0 installs 11.x)
    assert not known and tag.startswith("nvcr.io/nvidia/tritonserver:${TRITON_TAG:?")
    assert "TensorRT 11.4" in tag and "<" not in tag
    assert container_tag(None) == ("nvcr.io/nvidia/tritonserver:25.03-py3", True)  # ONNX


def _readme(tmp_path, manifest):
    artifact = tmp_path / "a.bin"
    artifact.write_bytes(b"x")
    write_repository(
        tmp_path / "repo", "m", artifact, _vouched(manifest, artifact), max_batch_size=4
    )
    return (tmp_path / "repo" / "README.md").read_text()


def test_readme_commands_have_no_literal_placeholders(tmp_path):
    """The ONNX README used to say `tritonserver:<YY.MM>-py3`, which a shell reads as a redirect."""
    readme = _readme(tmp_path, _manifest("onnx"))
    assert "nvcr.io/nvidia/tritonserver:25.03-py3 \\" in readme and "<YY.MM" not in readme
    readme = _readme(tmp_path, _manifest("tensorrt", trt="11.4.0.12"))
    assert "${TRITON_TAG:?set TRITON_TAG to the Triton release built on TensorRT 11.4}" in readme
    assert "export TRITON_TAG=" in readme and "support-matrix" in readme
    commands = [line for line in readme.splitlines() if "docker run" in line or "-v " in line]
    assert commands and not any("<" in line for line in commands)


def test_readme_of_a_version_compatible_plan_sets_the_triton_flag(tmp_path):
    readme = _readme(tmp_path, _manifest("tensorrt", nms=True, trt="10.3.0.26", compatible=True))
    flag = "--backend-config=tensorrt,version-compatible=true"
    serve = f"tritonserver --model-repository=/models \\\n    {flag}\n"
    assert serve in readme  # in the command, not only in the prose
    assert "TensorRT 10.3.0.26 or later" in readme


def test_plan_with_batch_min_above_one_is_refused(tmp_path):
    """Triton's dynamic batcher sends batches of one; the plan's profile would refuse them."""
    artifact = tmp_path / "a.plan"
    artifact.write_bytes(b"x")
    manifest = _manifest("tensorrt", trt="10.3.0.26", batch_min=2)
    with pytest.raises(ValueError, match="dynamic batcher.*--batch-min 1"):
        write_repository(tmp_path / "repo", "m", artifact, manifest, max_batch_size=4)
    onnx = _vouched(_manifest("onnx", batch_min=2), artifact)
    write_repository(tmp_path / "repo", "m", artifact, onnx, max_batch_size=4)


def test_wildcard_dims_are_refused():
    """A -1 beyond the batch axis would let Triton accept a model with other dims at load time."""
    manifest = _manifest()
    manifest["outputs"][1]["shape"] = [-1, -1, -1]  # what the dense export used to record
    with pytest.raises(ValueError, match="'scores'.*wildcard"):
        render_config("student", manifest, max_batch_size=16)


def test_parser_handles_text_format_syntax():
    text = """
    # comment
    name: "m"  max_batch_size: 4
    input [ { name: "images", data_type: TYPE_FP32, dims: [ 3, 64, 64 ] } ]
    input { name: "extra" data_type: TYPE_INT32 dims: 1 dims: 2 }
    parameters { key: "k" value: { string_value: "a \\"b\\" \\\\ c" } }
    """
    parsed = parse_pbtxt(text)
    assert parsed["max_batch_size"] == [4]
    assert [i["name"] for i in parsed["input"]] == [["images"], ["extra"]]
    assert parsed["input"][1]["dims"] == [1, 2]
    assert parsed["parameters"][0]["value"][0]["string_value"] == ['a "b" \\ c']


@pytest.mark.parametrize(
    "text, message",
    [
        ('name: "m"\ninput [ { name: "x" ', "missing"),
        ('name: "m"\nmax_batch_size: @', "line 2"),
        ('name "m"', "expected ':'"),
    ],
)
def test_parser_reports_syntax_errors_with_line_numbers(text, message):
    with pytest.raises(PbtxtError, match=message):
        parse_pbtxt(text)


def _valid_text(manifest):
    text = render_config("student", manifest, max_batch_size=16)
    parse_model_config(text)  # Triton's schema accepts it
    return text


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda t: t.replace("dims: [ 3, 800, 1344 ]", "dims: [ 3, 800, 1333 ]"),
            "expected TYPE_FP32",
        ),
        (lambda t: t.replace('name: "scores"', 'name: "logits"'), "output tensors"),
        (lambda t: t.replace("max_batch_size: 16", "max_batch_size: 32"), "max_batch_size"),
        (lambda t: t.replace("dynamic_batching {", "dynamic_batchin {"), "unknown field"),
        (lambda t: t.replace("kind: KIND_AUTO", 'kind: "GPU"'), "expected enum:KIND_"),
        (lambda t: t + 'name: "again"\n', "given 2 times"),
        (
            lambda t: t.replace('platform: "onnxruntime_onnx"', 'platform: "tensorrt_plan"'),
            "platform",
        ),
    ],
)
def test_validation_catches_mismatches(mutate, message):
    manifest = _manifest()
    parsed = parse_pbtxt(mutate(_valid_text(manifest)))
    with pytest.raises(PbtxtError, match=message):
        validate_config(parsed, manifest, name="student", max_batch_size=16)


def test_write_repository_refuses_bad_names_and_batches(tmp_path):
    artifact = tmp_path / "a.onnx"
    artifact.write_bytes(b"x")
    with pytest.raises(ValueError, match="--name"):
        write_repository(tmp_path, "bad name", artifact, _manifest(), max_batch_size=4)
    with pytest.raises(ValueError, match="--batch-max"):
        write_repository(tmp_path, "ok", artifact, _manifest(), max_batch_size=64)


@pytest.mark.parametrize(
    "change, check",
    [
        (lambda m: m, None),
        (lambda m: {**m, "status": "unchecked"}, "says status 'unchecked'"),
        (lambda m: {**m, "status": "failed"}, "says status 'failed'"),
        (lambda m: {k: v for k, v in m.items() if k != "sha256"}, "records no sha256"),
        (lambda m: {**m, "sha256": "0" * 64}, "sha256 mismatch: .* records 0{64} but"),
    ],
)
def test_write_repository_copies_only_what_the_manifest_vouches_for(tmp_path, change, check):
    """It used to copy any file next to any manifest into the repository."""
    artifact = tmp_path / "a.onnx"
    artifact.write_bytes(b"model bytes")
    manifest = change(_vouched(_manifest(), artifact))
    if check is None:
        write_repository(tmp_path / "repo", "m", artifact, manifest, max_batch_size=4)
        assert (tmp_path / "repo" / "m" / "1" / "model.onnx").read_bytes() == b"model bytes"
        return
    with pytest.raises(UnverifiedArtifactError, match=check):
        write_repository(tmp_path / "repo", "m", artifact, manifest, max_batch_size=4)
    assert not (tmp_path / "repo").exists()


def test_triton_format_end_to_end(tmp_path):
    pytest.importorskip("onnxruntime")
    from _export_fixtures import make_checkpoint

    from pgd_deploy.export.command import main

    ckpt = make_checkpoint(tmp_path / "student.pt", cls_bias=-1.0, box_bias=1.0)
    profile = Path(__file__).resolve().parents[1] / "export" / "triton.toml"
    flags = "--imgsz 64x64 --gate-images 2 --batch-opt 2 --batch-max 4 --no-simplify --name student"
    rc = main(
        ["--checkpoint", str(ckpt), "--profile", str(profile), "--out", str(tmp_path / "out")]
        + flags.split()
    )
    assert rc == 0
    cfg = read_repository_config(tmp_path / "out" / "triton" / "student")
    triton = read_model_config(tmp_path / "out" / "triton" / "student")
    assert triton.max_batch_size == 4 and triton.platform == "onnxruntime_onnx"
    assert dims(triton, "output")["det_boxes"] == [100, 4]
    assert cfg["max_batch_size"] == 4
    assert [o["name"] for o in cfg["output"]] == [
        "num_dets",
        "det_boxes",
        "det_scores",
        "det_classes",
    ]
    assert cfg["input"][0]["dims"] == [3, 64, 64]
