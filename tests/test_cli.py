"""Console scripts and the import boundary of the top-level package."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def test_import_pgd_deploy_is_light():
    code = (
        "import sys, pgd_deploy, pgd_deploy.config;"
        "mods = ('torch', 'numpy', 'torchvision', 'onnx', 'gradio');"
        "heavy = [m for m in mods if m in sys.modules];"
        "print(','.join(heavy))"
    )
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_pgd_train_help_lists_subcommands():
    proc = _run("-m", "pgd_deploy.cli", "--help")
    assert proc.returncode == 0
    for sub in ("fit", "eval", "data", "demo"):
        assert sub in proc.stdout
    proc = _run("-m", "pgd_deploy.cli", "data", "--help")
    assert all(name in proc.stdout for name in ("from-yolo", "crowdhuman", "shapes"))


@pytest.mark.parametrize("entry", ["export_main", "serve_main"])
def test_other_entry_points_have_help(entry):
    proc = _run(
        "-c", f"import sys; from pgd_deploy.cli import {entry}; sys.exit({entry}(['--help']))"
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()


def test_fit_errors_are_reported_not_raised(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[model]\ndepht = 50\n")
    proc = _run("-m", "pgd_deploy.cli", "fit", "--recipe", str(recipe))
    assert proc.returncode == 2
    assert "unknown config key 'model.depht'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_data_shapes_command(tmp_path):
    out = tmp_path / "shapes"
    proc = _run(
        "-m",
        "pgd_deploy.cli",
        "data",
        "shapes",
        "--out",
        str(out),
        "--train",
        "3",
        "--val",
        "2",
        "--size",
        "48",
        "--seed",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    assert len(list((out / "train").glob("*.jpg"))) == 3
    assert (out / "annotations" / "val.json").is_file()
