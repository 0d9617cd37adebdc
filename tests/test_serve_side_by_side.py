"""Tests of pgd_deploy.serve.side_by_side (the web demo's logic, no gradio) on real backends."""

from __future__ import annotations

import base64
import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_helpers import coco128_images, onnx_model, student_checkpoint

from pgd_deploy.config import ServeConfig
from pgd_deploy.data.shapes import render_image
from pgd_deploy.runtime.backends import load_backend
from pgd_deploy.serve.side_by_side import LATENCY_HEADERS, DemoApp, DemoModel, LatencyHistory

SCORE = 0.1


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> DemoApp:
    """The same weights as PyTorch (teacher) and ONNX Runtime (student): they must agree."""
    ckpt = student_checkpoint(tmp_path_factory)
    onnx = onnx_model(tmp_path_factory, ckpt)
    models = [
        DemoModel("teacher", ckpt, load_backend(ckpt)),
        DemoModel("student", onnx, load_backend(onnx)),
    ]
    demo = DemoApp(*models, ServeConfig(max_pixels=1_000_000, max_upload_mb=0.5, warmup=1))
    demo.warmup(np.asarray(render_image(0, "val", 0)[0]))
    return demo


def test_same_weights_on_two_runtimes_agree(app: DemoApp) -> None:
    image = np.asarray(render_image(0, "val", 1)[0])
    comp, _ = app.detect(image, SCORE, 0.6)
    assert len(comp.teacher.detections) > 0
    assert comp.agreement == 1.0
    assert comp.matched == len(comp.teacher.detections) == len(comp.student.detections)
    assert comp.teacher.matched.all() and comp.student.matched.all()
    details = comp.to_dict()
    assert details["teacher"]["only_this_model"] == 0 and details["agreement"] == 1.0
    assert comp.teacher.image.size == (512, 512)  # 128 px enlarged for display


def test_sliders_rerender_without_running_the_models(app: DemoApp, coco128: Path) -> None:
    calls = []
    for model in app.models:
        infer = model.backend.infer
        model.backend.infer = lambda x, infer=infer: calls.append(1) or infer(x)
    try:
        (path,) = coco128_images(coco128, 1)
        comp, cached = app.detect(app.decode(str(path)), SCORE, 0.6)
        assert len(calls) == 2
        strict = app.rerender(cached, 0.9, 0.6)
        loose = app.rerender(cached, SCORE, 0.3)
        assert len(calls) == 2, "re-rendering must not run the models"
    finally:
        for model in app.models:
            del model.backend.infer  # back to the class method
    assert len(strict.teacher.detections) == 0
    assert len(loose.teacher.detections) <= len(comp.teacher.detections)  # stricter NMS
    assert strict.teacher.run is comp.teacher.run  # the cached outputs, timings included
    # The display copy is enlarged to a 512 px short side (the photo is 640 px wide at most).
    assert min(comp.teacher.image.size) == 512


def test_latency_rows_and_history(app: DemoApp) -> None:
    image = np.asarray(render_image(0, "val", 2)[0])
    comp, _ = app.detect(image, SCORE, 0.6)
    rows = app.latency_rows(comp)
    assert [len(r) for r in rows] == [len(LATENCY_HEADERS)] * 2
    teacher = dict(zip(LATENCY_HEADERS, rows[0]))
    assert teacher["model"] == "teacher" and teacher["backend"].startswith("torch")
    assert teacher["total"] == pytest.approx(
        teacher["pre"] + teacher["infer"] + teacher["post"], abs=0.03
    )
    assert "detections" in app.side_markdown(comp, "student")
    history = LatencyHistory(size=3)
    for _ in range(5):
        history.add(comp)
    assert history.requests == 5 and len(history.snapshot()) == 6  # 3 requests x 2 models
    assert history.median_total_ms("student") > 0


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_decode_payloads_and_refusals(app: DemoApp, tmp_path: Path) -> None:
    small = Image.fromarray(np.full((10, 12, 3), 50, np.uint8))
    path = tmp_path / "a.png"
    small.save(path)
    assert app.decode({"path": str(path), "orig_name": "a.png"}).shape == (10, 12, 3)
    url = "data:image/png;base64," + base64.b64encode(_png_bytes(small)).decode()
    assert app.decode({"path": None, "url": url}).shape == (10, 12, 3)
    bomb = tmp_path / "bomb.png"
    Image.new("1", (2000, 2000)).save(bomb)
    with pytest.raises(ValueError, match="exceeds the limit of 1000000"):
        app.decode({"path": str(bomb), "orig_name": "bomb.png"})
    noise = np.random.default_rng(0).integers(0, 255, (500, 500, 3), np.uint8)
    encoded = base64.b64encode(_png_bytes(Image.fromarray(noise))).decode()
    with pytest.raises(ValueError, match="0.5 MB upload limit"):
        app.decode({"url": "data:image/png;base64," + encoded})
    with pytest.raises(ValueError, match="no image given"):
        app.decode(None)


def test_teacher_and_student_must_share_classes(app: DemoApp) -> None:
    teacher, student = app.models
    other = load_backend(student.path)
    other.class_names = ["cat", "dog", "bird"]
    with pytest.raises(ValueError, match="predict different classes"):
        DemoApp(teacher, DemoModel("student", student.path, other), ServeConfig())


def test_no_box_on_either_side_is_nothing_to_compare(app: DemoApp) -> None:
    """It used to report 100 % agreement when both models found nothing."""
    image = np.asarray(render_image(0, "val", 1)[0])
    comp, _ = app.detect(image, 0.99, 0.6)
    assert len(comp.teacher.detections) == len(comp.student.detections) == 0
    assert comp.agreement is None and comp.to_dict()["agreement"] is None
    pytest.importorskip("gradio")
    from pgd_deploy.serve.gradio_app import comparison_html

    panel = comparison_html(comp)
    assert "nothing to compare" in panel and "100%" not in panel


def test_the_score_slider_starts_where_both_models_show_boxes(app: DemoApp) -> None:
    images = [np.asarray(render_image(0, "val", i)[0]) for i in range(3)]
    start = app.start_score(images)
    assert 0.05 <= start <= DemoApp.START_MAX and round(start / 0.05, 6).is_integer()
    for model in app.models:  # at the start, each shows its boxes (3 per image on average)
        shown = [len(model.postprocess(model.run(im), start, 0.6)[0]) for im in images]
        assert sum(shown) >= DemoApp.START_BOXES * len(images), (model.role, start, shown)
    higher = round(start + 0.05, 2)
    if higher <= DemoApp.START_MAX:  # and it is the highest such threshold
        fewest = min(
            sum(len(m.postprocess(m.run(im), higher, 0.6)[0]) for im in images) for m in app.models
        )
        assert fewest < DemoApp.START_BOXES * len(images)
    cfg = app.cfg
    app.cfg = dataclasses.replace(cfg, demo_score=0.42)  # --score-thresh wins
    try:
        assert app.start_score(images) == 0.42
    finally:
        app.cfg = cfg
