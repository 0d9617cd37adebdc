"""Bad inputs reported in words that name the file and what was expected (issue 38, part 5):
a manifest that is not a JSON object, a recipe that is not UTF-8, an image this user may not
read, and an image past PIL's own decompression-bomb limit (quoting `max_pixels`)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from PIL import Image

from pgd_deploy.config import TrainJob, load_config
from pgd_deploy.runtime.manifest import read_manifest
from pgd_deploy.runtime.preprocess import ImageDecodeError, load_image


@pytest.mark.parametrize(
    "text, got", [("[1, 2]", "list"), ('"passed"', "str"), ("null", "NoneType")]
)
def test_a_manifest_that_is_not_a_json_object_is_named(tmp_path, text, got):
    model = tmp_path / "student.onnx"
    model.write_bytes(b"onnx")
    manifest = tmp_path / "student.manifest.json"
    manifest.write_text(text)
    with pytest.raises(
        ValueError, match=f"{manifest}: not a manifest: expected a JSON object.*got a JSON {got}"
    ):
        read_manifest(model)
    manifest.write_bytes(b"{\xff}")
    with pytest.raises(ValueError, match=f"{manifest}: not a manifest: not UTF-8"):
        read_manifest(model)


def test_predict_with_such_a_manifest_exits_2_with_one_line(tmp_path_factory, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from serve_helpers import onnx_model, student_checkpoint

    from pgd_deploy.serve.command import main

    real = onnx_model(tmp_path_factory, student_checkpoint(tmp_path_factory))
    model = tmp_path / "student.onnx"
    model.write_bytes(real.read_bytes())
    (tmp_path / "student.manifest.json").write_text("[]")
    (tmp_path / "in").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "a.png")
    argv = ["predict", "--model", str(model), "--source", str(tmp_path / "in")]
    assert main([*argv, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "holds a list, expected an object" in capsys.readouterr().err  # not verified
    argv += ["--allow-unverified"]  # served anyway: the backend reads the manifest itself
    assert main([*argv, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "student.manifest.json: not a manifest" in err, err


def test_a_recipe_that_is_not_utf8_names_the_file(tmp_path):
    recipe = tmp_path / "latin1.toml"
    recipe.write_bytes("[train]\n# réglage\nepochs = 1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{recipe}: a recipe must be UTF-8 TOML text; byte 11 "):
        load_config(TrainJob, recipe)


def test_an_image_this_user_may_not_read_is_not_called_corrupt(tmp_path, monkeypatch):
    path = tmp_path / "private.jpg"
    Image.new("RGB", (8, 8)).save(path)
    if os.geteuid() != 0:  # the real thing where the OS enforces it (root reads everything)
        path.chmod(0)
        with pytest.raises(ImageDecodeError, match=r"private\.jpg: permission denied"):
            load_image(path)
        path.chmod(0o644)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", denied)  # what open() raises for such a file
    with pytest.raises(ImageDecodeError) as err:
        load_image(path)
    assert "permission denied (Permission denied)" in str(err.value)
    assert "corrupt" not in str(err.value)


def test_an_image_past_pils_own_limit_quotes_max_pixels(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (14000, 14000)).save(path)  # 196 MP: PIL itself refuses past 2 x 89.5 MP
    assert path.stat().st_size < 2_000_000
    with pytest.raises(ImageDecodeError) as err:
        load_image(path, max_pixels=40_000_000)
    message = str(err.value)
    assert message == (
        f"{path}: 196000000 pixels exceeds the limit of 40000000 (possible decompression bomb)"
    )
    with pytest.raises(ImageDecodeError, match="196000000 pixels exceeds PIL's limit"):
        load_image(Path(path).read_bytes(), name="upload", max_pixels=None)
