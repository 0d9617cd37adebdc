"""`pgd-export` end to end: gates, exit codes, clear errors, profiles and overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from _export_fixtures import coco128, make_checkpoint  # noqa: E402

from pgd_deploy.config import ExportJob, load_config  # noqa: E402
from pgd_deploy.export.command import main, parse_imgsz  # noqa: E402
from pgd_deploy.runtime.manifest import read_manifest  # noqa: E402

PROFILES = Path(__file__).resolve().parents[1] / "export"
FAST = [
    "--imgsz",
    "64x96",
    "--gate-images",
    "4",
    "--batch-opt",
    "2",
    "--batch-max",
    "4",
    "--no-simplify",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "student.pt")


def test_export_passes_gates_on_coco128(ckpt, tmp_path, capsys):
    val = coco128()
    rc = main(
        [
            "--checkpoint",
            str(ckpt),
            "--format",
            "onnx",
            "--val",
            str(val),
            "--out",
            str(tmp_path),
            *FAST,
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    manifest = read_manifest(tmp_path / "student_fp32.onnx")
    assert manifest["status"] == "passed"
    assert manifest["gates"]["results"][0]["name"] == "parity"
    assert manifest["gates"]["images"] == 4 and str(val) in manifest["gate_images"]
    assert manifest["sha256"] and manifest["export_config"]["export"]["imgsz"] == [64, 96]
    assert "| parity | pass |" in (tmp_path / "student_fp32.gates.md").read_text()
    assert (tmp_path / "student_fp32.export.toml").is_file()
    assert "wrote" in out and "Overall: **PASSED**" in out


def test_impossible_tolerance_fails_the_gate_and_marks_the_manifest(ckpt, tmp_path, capsys):
    rc = main(
        [
            "--checkpoint",
            str(ckpt),
            "--out",
            str(tmp_path),
            "--name",
            "strict",
            *FAST,
            "--set",
            "gates.fp32_box_atol=1e-12",
            "--set",
            "gates.fp32_score_atol=1e-12",
        ]
    )
    assert rc == 3  # the parity gate's exit code
    assert (tmp_path / "strict.onnx").is_file()  # kept, but marked failed
    manifest = read_manifest(tmp_path / "strict.onnx")
    assert manifest["status"] == "failed"
    assert manifest["gates"]["results"][0]["passed"] is False
    assert "FAIL" in capsys.readouterr().out


def test_truncated_checkpoint_is_a_clear_error(ckpt, tmp_path, capsys):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(ckpt.read_bytes()[:2000])
    rc = main(["--checkpoint", str(broken), "--out", str(tmp_path), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "broken.pt" in err
    assert "truncated or corrupt" in err
    assert not list(tmp_path.glob("*.onnx"))


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path, capsys):
    wrong = make_checkpoint(tmp_path / "r18_says_r50.pt", depth=18, config_depth=50)
    rc = main(["--checkpoint", str(wrong), "--out", str(tmp_path), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "r18_says_r50.pt" in err
    assert "do not match the architecture" in err and "depth 50" in err


def test_missing_checkpoint(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope.pt"), *FAST]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-min", "4", "--batch-opt", "2"], "--batch-opt"),
        (["--batch-opt", "8", "--batch-max", "4"], "--batch-max"),
        (["--batch-min", "0"], "--batch-min"),
        (["--imgsz", "100x96"], "--imgsz"),
        (["--set", "export.gate_images=0"], "--gate-images"),
        (["--set", "export.nope=1"], "unknown config key 'export.nope'"),
        (["--set", "gates.fp32_box_atol=big"], "gates.fp32_box_atol"),
    ],
)
def test_profile_validation_names_the_flag(ckpt, tmp_path, capsys, flags, message):
    base = ["--checkpoint", str(ckpt), "--out", str(tmp_path)]
    args = [*base, "--imgsz", "64x96", *flags]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_bad_imgsz_text_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        main(["--checkpoint", "x.pt", "--imgsz", "big"])
    assert "--imgsz" in capsys.readouterr().err
    assert parse_imgsz("640") == [640, 640] and parse_imgsz("800x1344") == [800, 1344]


@pytest.mark.parametrize("name", ["onnx", "tensorrt_fp16", "tensorrt_int8", "triton"])
def test_profiles_load_and_flags_override_them(name):
    job = load_config(
        ExportJob, PROFILES / f"{name}.toml", ["export.imgsz=[64, 96]", "gates.fp16_mean_abs=0.5"]
    )
    assert job.export.imgsz == (64, 96) and job.gates.fp16_mean_abs == 0.5
    assert job.export.opset == 17 and job.export.exporter == "legacy"
    assert job.export.batch_min <= job.export.batch_opt <= job.export.batch_max


def test_help_for_both_commands(capsys):
    for argv in (["--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--checkpoint" in out and "--artifact" in out


def test_console_script_entry_point(capsys):
    from pgd_deploy.cli import export_main

    with pytest.raises(SystemExit):
        export_main(["--help"])
    assert "Exit codes" in capsys.readouterr().out


def test_manifest_is_json_beside_the_artifact(ckpt, tmp_path):
    # the manifest of the passing export above is plain JSON a C++ consumer can read
    rc = main(
        [
            "--checkpoint",
            str(ckpt),
            "--out",
            str(tmp_path),
            "--name",
            "m",
            *FAST,
            "--nms",
            "onnx",
            "--max-det",
            "30",
            "--conf",
            "0.1",
        ]
    )
    assert rc == 0
    manifest = json.loads((tmp_path / "m.manifest.json").read_text())
    assert manifest["nms"]["mode"] == "onnx" and manifest["nms"]["max_det"] == 30
    assert [o["name"] for o in manifest["outputs"]] == [
        "num_dets",
        "det_boxes",
        "det_scores",
        "det_classes",
    ]
    assert manifest["outputs"][1]["shape"] == [-1, 30, 4]
    assert manifest["postprocess"]["score_thresh"] == 0.1
