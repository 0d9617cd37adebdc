"""Nothing is served that its export did not finish and vouch for (issue 32, part 1).

`pgd-serve predict` and the demo used to load an export whose gates never finished (no manifest,
or one that says `unchecked`), another model saved under a passed export's name, flipped weight
bytes and a manifest with edited category ids, all with exit 0 and no warning.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from serve_helpers import onnx_model, student_checkpoint, teacher_checkpoint

from pgd_deploy.io_utils import file_sha256
from pgd_deploy.runtime import verify
from pgd_deploy.runtime.manifest import manifest_path, read_manifest, write_manifest
from pgd_deploy.runtime.verify import UnverifiedArtifactError, verify_artifact


def _artifact(folder: Path, **manifest) -> Path:
    """A file with a manifest that vouches for it, then `manifest`'s changes."""
    path = folder / "m.onnx"
    path.write_bytes(b"model bytes")
    base = {"status": "passed", "sha256": file_sha256(path)}
    write_manifest(path, {k: v for k, v in {**base, **manifest}.items() if v is not None})
    return path


def test_a_file_its_manifest_vouches_for_is_verified(tmp_path: Path) -> None:
    result = verify_artifact(_artifact(tmp_path))
    assert result.warnings == () and result.sha256 == file_sha256(tmp_path / "m.onnx")


@pytest.mark.parametrize(
    "manifest, check",
    [
        ({"status": "unchecked"}, "says status 'unchecked': its accuracy gates never finished"),
        ({"status": None}, "says status None, expected 'passed'"),
        ({"sha256": None}, "records no sha256 of the file"),
        ({"sha256": "0" * 64}, "sha256 mismatch: the manifest .* records 0{64} but the file "),
    ],
)
def test_each_failed_check_is_named_with_the_override(tmp_path, manifest, check) -> None:
    path = _artifact(tmp_path, **manifest)
    with pytest.raises(UnverifiedArtifactError, match=check) as raised:
        verify_artifact(path)
    assert str(raised.value).startswith(f"{path}: not served, it is not verified: ")
    assert "pass --allow-unverified to serve it anyway" in str(raised.value)
    served = verify_artifact(path, allow_unverified=True)
    assert len(served.warnings) == 1 and "--allow-unverified" in served.warnings[0]


def test_both_hashes_are_shown(tmp_path: Path) -> None:
    path = _artifact(tmp_path, sha256="ab" * 32)
    with pytest.raises(UnverifiedArtifactError) as raised:
        verify_artifact(path)
    assert "ab" * 32 in str(raised.value) and file_sha256(path) in str(raised.value)


def test_a_missing_or_broken_manifest_is_an_unfinished_export(tmp_path: Path) -> None:
    path = _artifact(tmp_path)
    manifest_path(path).unlink()
    with pytest.raises(UnverifiedArtifactError, match="no manifest .*m.manifest.json beside it"):
        verify_artifact(path)
    manifest_path(path).write_text('{"status": "pass')  # cut short
    with pytest.raises(UnverifiedArtifactError, match="is not valid JSON"):
        verify_artifact(path)
    manifest_path(path).write_text("[1, 2]")
    with pytest.raises(UnverifiedArtifactError, match="holds a list, expected an object"):
        verify_artifact(path)


def test_failed_gates_need_allow_failed_and_the_hash_still_counts(tmp_path: Path) -> None:
    path = _artifact(tmp_path, status="failed")
    with pytest.raises(ValueError, match="says status 'failed'.*--allow-failed") as raised:
        verify_artifact(path, allow_unverified=True)  # the other flag does not serve it
    assert not isinstance(raised.value, UnverifiedArtifactError)
    assert "served anyway (--allow-failed)" in verify_artifact(path, allow_failed=True).warnings[0]
    path.write_bytes(b"other bytes")
    with pytest.raises(UnverifiedArtifactError, match="sha256 mismatch"):
        verify_artifact(path, allow_failed=True)


def test_checkpoints_keep_their_own_checks(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"not checked here")
    assert verify_artifact(ckpt).warnings == ()
    with pytest.raises(FileNotFoundError, match="no such model file"):
        verify_artifact(tmp_path / "gone.onnx")


def test_the_hash_is_computed_once_per_file_version(tmp_path: Path, monkeypatch) -> None:
    path = _artifact(tmp_path)
    calls = []
    real = verify.file_sha256
    monkeypatch.setattr(verify, "file_sha256", lambda p: calls.append(p) or real(p))
    verify_artifact(path)
    verify_artifact(path)
    assert len(calls) == 1
    path.write_bytes(b"changed, longer bytes")  # size and mtime change: hashed again, refused
    with pytest.raises(UnverifiedArtifactError, match="sha256 mismatch"):
        verify_artifact(path)
    assert len(calls) == 2


# --- pgd-serve predict and the demo, on real exports ----------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(student, teacher): fp32 ONNX files from real pgd-export runs, both passed."""
    student = onnx_model(tmp_path_factory, student_checkpoint(tmp_path_factory))
    teacher = onnx_model(tmp_path_factory, teacher_checkpoint(tmp_path_factory))
    return student, teacher


@pytest.fixture
def images(tmp_path: Path) -> Path:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (96, 80), (90, 120, 200)).save(folder / "a.png")
    return folder


def _copy(model: Path, folder: Path) -> Path:
    """`model` and its manifest copied into `folder` (the test changes the copy)."""
    folder.mkdir(exist_ok=True)
    shutil.copy(model, folder / model.name)
    shutil.copy(manifest_path(model), manifest_path(folder / model.name))
    return folder / model.name


def _predict(model: Path, images: Path, out: Path, *flags: str) -> int:
    from pgd_deploy.serve.command import main

    argv = ["predict", "--model", str(model), "--source", str(images), "--out", str(out)]
    return main([*argv, "--no-progress", *flags])


def test_a_passed_export_is_served_and_the_summary_says_verified(exported, images, tmp_path):
    assert read_manifest(exported[0])["status"] == "passed"
    assert _predict(exported[0], images, tmp_path / "out") == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["warnings"] == []


def _tamper(kind: str, student: Path, teacher: Path) -> str:
    """Change `student` (a copy) as `kind` says; returns the check that must refuse it."""
    if kind == "another model under its name":
        shutil.copy(teacher, student)
        return "sha256 mismatch"
    if kind == "flipped weight bytes":
        data = bytearray(student.read_bytes())
        data[len(data) // 2] ^= 0xFF  # inside the weights: ONNX Runtime would load it
        student.write_bytes(bytes(data))
        return "sha256 mismatch"
    if kind == "edited category ids":
        manifest = read_manifest(student)
        manifest["category_ids"] = [7, 8, 9]  # same count: only the model's own record differs
        write_manifest(student, manifest)
        return r"manifest says category_ids \[7, 8, 9\] but the model itself records \[1, 2, 3\]"
    if kind == "no manifest":
        manifest_path(student).unlink()
        return "no manifest"
    manifest = read_manifest(student)
    write_manifest(student, {**manifest, "status": "unchecked"})
    return "says status 'unchecked'"


KINDS = [
    "another model under its name",
    "flipped weight bytes",
    "edited category ids",
    "no manifest",
    "gates unfinished",
]


@pytest.mark.parametrize("kind", KINDS)
def test_predict_refuses_what_the_manifest_does_not_vouch_for(
    kind, exported, images, tmp_path, capsys, caplog
) -> None:
    student = _copy(exported[0], tmp_path / "exports")
    check = _tamper(kind, student, exported[1])
    assert _predict(student, images, tmp_path / "refused") == 2
    err = capsys.readouterr().err
    assert f"{student}: not served, it is not verified" in err and "--allow-unverified" in err
    assert re.search(check, err), err
    assert not (tmp_path / "refused").exists()  # refused before any output
    with caplog.at_level("WARNING"):
        assert _predict(student, images, tmp_path / "served", "--allow-unverified") == 0
    assert "UNVERIFIED, served anyway (--allow-unverified)" in caplog.text
    summary = json.loads((tmp_path / "served" / "summary.json").read_text())
    assert summary["warnings"] and all("--allow-unverified" in w for w in summary["warnings"])
    assert "NOT VERIFIED, served anyway" in capsys.readouterr().out


def test_the_demo_refuses_a_tampered_side_before_loading_either(exported, tmp_path) -> None:
    pytest.importorskip("gradio")
    from pgd_deploy.serve.gradio_app import open_app

    student = _copy(exported[0], tmp_path / "exports")
    _tamper("flipped weight bytes", student, exported[1])
    with pytest.raises(UnverifiedArtifactError, match=f"{student}: not served.*sha256 mismatch"):
        open_app(exported[1], student, device="cpu")
    app = open_app(exported[1], student, device="cpu", allow_unverified=True)
    teacher_side, student_side = app.models
    assert "NOT VERIFIED" in student_side.describe()
    assert "NOT VERIFIED" not in teacher_side.describe()


def test_an_export_killed_before_its_gates_end_is_not_served(exported, images, tmp_path, capsys):
    """pgd-export killed (SIGKILL) once its ONNX is written, while it gates: the file is there,
    its manifest does not vouch for it (`unchecked`, or none yet), and predict refuses it."""
    import signal
    import subprocess
    import sys
    import time

    ckpt = exported[0].with_suffix(".pt")  # the student checkpoint it was exported from
    argv = ["--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), "--name", "early"]
    argv += ["--imgsz", "128x128", "--gate-images", "64", "--precision", "fp16"]
    code = "import sys; from pgd_deploy.export.command import main; sys.exit(main(sys.argv[1:]))"
    export = subprocess.Popen([sys.executable, "-c", code, *argv], stderr=subprocess.DEVNULL)
    model = tmp_path / "x" / "early.onnx"
    deadline = time.monotonic() + 300
    while not model.exists() and export.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    export.send_signal(signal.SIGKILL)
    export.wait(timeout=30)
    if export.returncode != -signal.SIGKILL or not model.exists():
        pytest.skip(f"pgd-export ended ({export.returncode}) before it could be killed mid-gate")
    manifest = model.with_name("early.manifest.json")
    assert not manifest.exists() or read_manifest(model)["status"] == "unchecked"
    capsys.readouterr()
    assert _predict(model, images, tmp_path / "o") == 2
    assert "not verified" in capsys.readouterr().err
