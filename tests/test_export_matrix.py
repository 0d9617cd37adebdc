"""Every export profile in `export/` x `--nms none|onnx`, end to end through `pgd-export`, on a CPU.

The TensorRT engine build and runner are replaced by ONNX Runtime on the source ONNX
(`_trt_standin`, test code only), so the whole control flow after the build runs here: the plan's
manifest, its three gates (an NMS plan: tensor parity on a dense twin, detection agreement and mAP
on its own NMS outputs), the Triton repository. The checkpoints really detect (`trained_run`,
FCOS, `atss_trained_run` and `gfl_trained_run`), so the agreement and mAP gates compare real
detections, not empty lists. The ONNX fp16 and int8 cases (both int8 targets) run every head
through the precision paths too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import _trt_standin  # noqa: E402
from _triton_schema import dims, read_model_config  # noqa: E402

from pgd_deploy.export.command import main  # noqa: E402
from pgd_deploy.io_utils import file_sha256  # noqa: E402
from pgd_deploy.runtime.manifest import read_manifest  # noqa: E402

PROFILES = Path(__file__).resolve().parents[1] / "export"
CASES = {  # case -> (profile, extra flags)
    "onnx": ("onnx", []),
    "onnx_fp16": ("onnx", ["--precision", "fp16"]),
    "onnx_int8_cpu": ("onnx", ["--precision", "int8", "--calib-images", "16"]),
    "onnx_int8_tensorrt": (
        "onnx",
        ["--precision", "int8", "--int8-target", "tensorrt", "--calib-images", "16"],
    ),
    "tensorrt_fp16": ("tensorrt_fp16", []),
    "tensorrt_int8": ("tensorrt_int8", ["--calib-images", "16"]),
    "triton_onnx": ("triton", ["--set", 'export.triton_source="onnx"']),
    "triton_tensorrt": ("triton", ["--set", 'export.triton_source="tensorrt"']),
}


@pytest.fixture
def trt_standin(monkeypatch):
    return _trt_standin.install(monkeypatch)


def _export(run, out: Path, case: str, nms: str) -> int:
    profile, extra = CASES[case]
    return main(
        [
            "--checkpoint",
            str(run["checkpoint"]),
            "--profile",
            str(PROFILES / f"{profile}.toml"),
            "--nms",
            nms,
            "--imgsz",
            "64x64",
            "--batch-opt",
            "2",
            "--batch-max",
            "4",
            "--gate-images",
            "8",
            "--no-simplify",
            "--val",
            str(run["val_json"]),
            "--val-images",
            str(run["val_images"]),
            "--out",
            str(out),
            "--name",
            "m",
            "--set",
            'export.timing_cache=""',
            *extra,
        ]
    )


def _check_gated(manifest: dict, *, nms: str) -> None:
    assert manifest["status"] == "passed", json.dumps(manifest["gates"], indent=1)[:3000]
    results = {r["name"]: r for r in manifest["gates"]["results"]}
    assert set(results) == {"parity", "agreement", "map"}
    assert results["map"]["passed"] is True  # --val annotations: the mAP gate really ran
    assert results["agreement"]["detail"]["reference_detections"] > 0
    parity_outputs = set(results["parity"]["detail"]["outputs"])
    assert parity_outputs == {"boxes", "scores"}  # an NMS artifact: on its dense twin
    names = [o["name"] for o in manifest["outputs"]]
    if nms == "onnx":
        assert names == ["num_dets", "det_boxes", "det_scores", "det_classes"]
    else:
        assert names == ["boxes", "scores"]


# head -> its trained fixture
RUNS = {"fcos": "trained_run", "atss": "atss_trained_run", "gfl": "gfl_trained_run"}


@pytest.mark.trained
@pytest.mark.parametrize("nms", ["none", "onnx"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("head", list(RUNS))
def test_every_profile_exports_with_gated_manifests(
    request, trt_standin, tmp_path, head, case, nms
):
    run = request.getfixturevalue(RUNS[head])
    rc = _export(run, tmp_path, case, nms)
    onnx_manifest = read_manifest(tmp_path / "m.onnx")
    assert rc == 0, json.dumps(onnx_manifest and onnx_manifest["gates"], indent=1)[:3000]
    assert onnx_manifest["format"] == "onnx"  # the plan's manifest did not overwrite it
    assert onnx_manifest["sha256"] == file_sha256(tmp_path / "m.onnx")
    _check_gated(onnx_manifest, nms=nms)
    plan = tmp_path / "m_trt.plan"
    wants_plan = case.startswith("tensorrt") or case == "triton_tensorrt"
    assert plan.is_file() == wants_plan
    if wants_plan:
        plan_manifest = read_manifest(plan)
        _check_gated(plan_manifest, nms=nms)
        assert plan_manifest["format"] == "tensorrt"
        assert plan_manifest["sha256"] == file_sha256(plan)
        assert plan_manifest["tensorrt"]["gpu"] == _trt_standin.STANDIN_GPU["gpu"]
        assert plan_manifest["gates"]["runtime"].startswith("tensorrt")
        built = [Path(b["onnx_path"]).name for b in trt_standin.builds]
        # an NMS plan is gated with a dense twin plan built alongside it from the dense ONNX
        assert built == (["m.onnx", "dense.onnx"] if nms == "onnx" else ["m.onnx"])
        assert ("parity_on" in plan_manifest["gates"]) == (nms == "onnx")
    else:
        assert not trt_standin.builds
    if case.startswith("triton"):
        model_dir = tmp_path / "triton" / "m"
        artifact = "model.plan" if wants_plan else "model.onnx"
        assert (model_dir / "1" / artifact).is_file()
        config = read_model_config(model_dir)  # Triton's schema, strict
        assert config.platform == ("tensorrt_plan" if wants_plan else "onnxruntime_onnx")
        assert config.max_batch_size == 4
        assert dims(config, "input") == {"images": [3, 64, 64]}
        assert all(d > 0 for shape in dims(config, "output").values() for d in shape)
        readme = (tmp_path / "triton" / "README.md").read_text()
        assert "<YY.MM" not in readme and "tritonserver --model-repository=/models" in readme
    else:
        assert not (tmp_path / "triton").exists()


def test_triton_plan_with_batch_min_above_one_is_refused_before_any_work(tmp_path, capsys):
    """Triton's dynamic batcher sends batches of one; a plan profile from 2 would refuse them."""
    args = [
        "--checkpoint",
        str(tmp_path / "never_read.pt"),
        "--format",
        "triton",
        "--batch-min",
        "2",
        "--batch-opt",
        "2",
        "--set",
        'export.triton_source="tensorrt"',
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--batch-min 2" in err and "dynamic batcher" in err and "--batch-min 1" in err
    args[args.index('export.triton_source="tensorrt"')] = 'export.triton_source="onnx"'
    assert main(args) == 2  # the ONNX route accepts it: the error is now the missing checkpoint
    assert "checkpoint not found" in capsys.readouterr().err
