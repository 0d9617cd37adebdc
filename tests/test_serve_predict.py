"""Tests of `pgd-serve predict` (serve.predictor, serve.outputs) on real images and a real ONNX
model: bad files become failures, all-failed exits non-zero, Ctrl-C leaves valid JSON, output
names stay inside --out, batching does not change results, and --eval prints COCO metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serve_helpers import coco128_images, default_sigint, onnx_model, student_checkpoint

from pgd_deploy.metrics import detections_to_coco
from pgd_deploy.runtime.backends import load_backend
from pgd_deploy.runtime.preprocess import load_image
from pgd_deploy.serve.command import main
from pgd_deploy.serve.outputs import ImageSaver, JsonArrayWriter
from pgd_deploy.serve.sources import SourceItem


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return onnx_model(tmp_path_factory, student_checkpoint(tmp_path_factory))


def _folder_with_bad_files(folder: Path, images: list[Path]) -> Path:
    folder.mkdir()
    for image in images:  # links: the dataset is never copied
        (folder / image.name).symlink_to(image)
    data = images[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(3000))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    # Entries that are not regular files are inputs too, reported as failures (never opened).
    (folder / "broken_link.jpg").symlink_to(folder / "gone.jpg")
    (folder / "loop_a.jpg").symlink_to(folder / "loop_b.jpg")
    (folder / "loop_b.jpg").symlink_to(folder / "loop_a.jpg")
    os.mkfifo(folder / "pipe.jpg")
    (folder / "sub").mkdir()  # a folder is not searched (a glob with ** does that)
    return folder


def test_json_array_writer_is_valid_after_every_extend(tmp_path: Path) -> None:
    writer = JsonArrayWriter(tmp_path / "a.json")
    assert json.loads((tmp_path / "a.json").read_text()) == []
    expected: list[dict] = []
    for k in range(4):
        batch = [{"k": k, "i": i, "s": 'é"]'} for i in range(k)]  # k = 0: nothing written
        writer.extend(batch)
        expected += batch
        assert json.loads((tmp_path / "a.json").read_text(encoding="utf-8")) == expected
    writer.close()
    assert writer.count == 6


@pytest.mark.parametrize(
    "name",
    ["../../etc/passwd", "/abs/path/x.jpg", "a/b/c.png", "..", "", "x\\..\\y.jpg", "ünï cödé?.png"],
)
def test_annotated_image_names_stay_inside_out(tmp_path: Path, name: str) -> None:
    root = tmp_path / "out" / "images"
    saver = ImageSaver(root, ["a"], min_score=0.3)
    try:
        first = saver.output_path(SourceItem(3, Path(name), name, 1))
        second = saver.output_path(SourceItem(4, Path(name), name, 2))
    finally:
        saver.close()
    for path in (first, second):
        assert path.parent == root.resolve()
        assert path.suffix == ".jpg" and not path.name.startswith(".")
    assert first != second  # a clash gets the input index appended


def test_predict_folder_with_bad_files(
    tmp_path: Path, coco128: Path, model: Path, capsys: pytest.CaptureFixture
) -> None:
    images = coco128_images(coco128, 4)
    src = _folder_with_bad_files(tmp_path / "src", images)
    out = tmp_path / "out"
    argv = ["predict", "--model", str(model), "--source", str(src), "--out", str(out)]
    rc = main([*argv, "--batch", "3", "--save-images", "--no-progress", "--score-thresh", "0.1"])
    assert rc == 0
    failures = json.loads((out / "failures.json").read_text())
    reasons = {Path(f["path"]).name: f["error"] for f in failures}
    assert set(reasons) == {
        "truncated.jpg",
        "corrupt.jpg",
        "empty.jpg",
        "notes.txt",
        "broken_link.jpg",
        "loop_a.jpg",
        "loop_b.jpg",
        "pipe.jpg",
    }
    assert "truncated" in reasons["truncated.jpg"] and "empty file" in reasons["empty.jpg"]
    assert "not a recognised image format" in reasons["notes.txt"]
    assert "broken symbolic link" in reasons["broken_link.jpg"]
    assert "symbolic link loop" in reasons["loop_a.jpg"] and "loop" in reasons["loop_b.jpg"]
    assert "FIFO" in reasons["pipe.jpg"]
    results = json.loads((out / "predictions.json").read_text())
    assert results, "the random model with a raised bias detects plenty"
    assert {r["image_id"] for r in results} <= {int(p.stem) for p in images}
    assert {r["category_id"] for r in results} <= {1, 2, 3}
    assert all(r["score"] >= 0.1 and len(r["bbox"]) == 4 for r in results)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(p.name for p in images)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["succeeded"], summary["failed"], summary["interrupted"]) == (4, 8, False)
    assert set(summary["stage_ms"]) >= {"pre", "infer", "post"}
    printed = capsys.readouterr().out
    for key in ("images", "failures", "detections", "ms / image", "images / s"):
        assert key in printed


def test_batched_results_equal_one_image_at_a_time(
    tmp_path: Path, coco128: Path, model: Path
) -> None:
    images = coco128_images(coco128, 5)
    out = tmp_path / "out"
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in images))
    argv = ["predict", "--model", str(model), "--source", str(listing), "--out", str(out)]
    assert main([*argv, "--batch", "4", "--workers", "3", "--no-progress"]) == 0
    got = json.loads((out / "predictions.json").read_text())
    backend = load_backend(model)
    expected = []
    for path in images:
        (dets,) = backend.predict([load_image(path)], score_thresh=0.05, nms_thresh=0.6)
        expected += detections_to_coco(int(path.stem), dets, backend.category_ids)
    assert got, "the random model with a raised bias detects plenty"
    # serve/README.md: "identical to running one image at a time", boxes and scores included
    assert got == json.loads(json.dumps(expected))


def test_all_inputs_failed_exits_nonzero(tmp_path: Path, model: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"")
    (src / "b.png").write_text("nope")
    out = tmp_path / "out"
    argv = ["predict", "--model", str(model), "--source", str(src), "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 1
    assert json.loads((out / "predictions.json").read_text()) == []
    assert len(json.loads((out / "failures.json").read_text())) == 2


def test_usage_errors_exit_2(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["predict", "--model", str(model), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main([*argv, "--source", str(tmp_path / "nothing")]) == 2
    assert "no such file, folder or glob match" in capsys.readouterr().err
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.png").write_bytes(b"")
    assert main([*argv, "--source", str(tmp_path / "src"), "--eval"]) == 2
    assert "--eval needs a COCO annotation JSON" in capsys.readouterr().err
    bad_model = tmp_path / "model.bin"
    bad_model.write_bytes(b"x")
    assert main(["predict", "--model", str(bad_model), "--source", str(tmp_path / "src")]) == 2
    assert "unknown artifact type" in capsys.readouterr().err


def test_eval_on_coco128_val_prints_metrics(
    tmp_path: Path, coco128: Path, model: Path, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("pycocotools")
    from pgd_deploy.data.yolo import yolo_to_coco

    val = coco128 / "images" / "val2017"
    ann = tmp_path / "val.json"
    yolo_to_coco(val, coco128 / "labels" / "val2017", coco128 / "config.yaml", ann)
    data = json.loads(ann.read_text())
    keep = {img["id"] for img in data["images"][:12]}  # a subset keeps the test fast
    data["images"] = [img for img in data["images"] if img["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    ann.write_text(json.dumps(data))
    out = tmp_path / "out"
    argv = ["predict", "--model", str(model), "--source", str(ann), "--image-root", str(val)]
    # The model's ids 1-3 are circle, square, triangle; in COCO they are person, bicycle, car.
    # That used to give AP 0.0 without a word.
    assert main([*argv, "--out", str(tmp_path / "refused"), "--eval", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "1: 'circle' vs 'person', 2: 'square' vs 'bicycle', 3: 'triangle' vs 'car'" in err
    assert "the dataset it was trained on" in err and not (tmp_path / "refused").exists()
    for category in data["categories"][:3]:  # a dataset labelled with the model's classes
        category["name"] = ["circle", "Square", "triangle"][category["id"] - 1]
    ann.write_text(json.dumps(data))
    assert main([*argv, "--out", str(out), "--eval", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "COCO bbox (12 images)" in printed and "AP50" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert 0.0 <= metrics["AP"] <= 1.0  # random weights: near zero, but evaluated for real


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_leaves_valid_json(tmp_path: Path, coco128: Path, model: Path, sig) -> None:
    images = coco128_images(coco128, 8)
    listing = tmp_path / "many.txt"
    listing.write_text("\n".join(str(p) for p in images * 250))  # 2000 inputs: minutes of work
    out = tmp_path / "out"
    code = (
        "import sys; sys.modules['torch'] = None  # the serving path needs no torch\n"
        "from pgd_deploy.serve.command import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["predict", "--model", str(model), "--source", str(listing), "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv, "--batch", "2", "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            results = out / "predictions.json"
            if results.exists() and len(json.loads(results.read_text())) > 0:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "INTERRUPTED" in stdout
    results = json.loads((out / "predictions.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and 0 < summary["processed"] < 2000
    assert {r["image_id"] for r in results} <= {int(p.stem) for p in images}
    assert json.loads((out / "failures.json").read_text()) == []


def test_a_new_run_into_the_same_out_leaves_nothing_of_the_previous_one(
    tmp_path: Path, coco128: Path, model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = coco128_images(coco128, 5)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    for image in images[:3]:
        (first / image.name).symlink_to(image)
    for image in images[3:]:
        (second / image.name).symlink_to(image)
    out = tmp_path / "out"
    argv = ["predict", "--model", str(model), "--out", str(out), "--no-progress"]
    assert main([*argv, "--source", str(first), "--save-images"]) == 0
    (out / "metrics.json").write_text("{}")  # as an earlier --eval run leaves it
    assert sorted(p.name for p in (out / "images").iterdir()) == [p.name for p in images[:3]]
    # It used to leave the first run's annotated images beside the second run's.
    assert main([*argv, "--source", str(second), "--save-images"]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == [p.name for p in images[3:]]
    assert not (out / "metrics.json").exists()
    assert main([*argv, "--source", str(second)]) == 0  # no --save-images: no stale images
    assert not (out / "images").exists()
    # A folder pgd-serve did not write is never emptied or mixed with annotated images.
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "holiday.jpg").write_bytes(b"my photo")
    argv = ["predict", "--model", str(model), "--out", str(mine), "--source", str(second)]
    assert main([*argv, "--save-images", "--no-progress"]) == 2
    assert (mine / "images" / "holiday.jpg").read_bytes() == b"my photo"
    assert not (mine / "predictions.json").exists()
    assert main([*argv, "--no-progress"]) == 0
    assert (mine / "images" / "holiday.jpg").read_bytes() == b"my photo"
