"""The teacher-vs-student web demo, served for real on 127.0.0.1 and called over HTTP with
gradio_client (and, in the slow test, loaded in headless Chromium)."""

from __future__ import annotations

import io
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_helpers import (
    coco128_images,
    onnx_model,
    student_checkpoint,
    teacher_checkpoint,
)

from pgd_deploy.config import ServeConfig
from pgd_deploy.runtime.backends import load_backend
from pgd_deploy.serve.side_by_side import DemoApp, DemoModel

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

CHROMIUM = "/usr/bin/chromium"
SCORE = 0.1  # random weights score about 0.13


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Counted:
    """Counts `infer` calls of a real backend (to prove that sliders do not re-run models)."""

    def __init__(self, backend) -> None:
        self.calls = 0
        self._infer = backend.infer
        backend.infer = self._count

    def _count(self, images):
        self.calls += 1
        return self._infer(images)


def _examples_folder(folder: Path) -> Path:
    """An --examples folder as users have them: images, and files that must never be served."""
    folder.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 60, 3), np.uint8)).save(
        folder / "street.png"
    )
    (folder / "fake.jpg").write_text("not an image")  # an image suffix is not enough
    (folder / "notes.txt").write_text("not an example")
    (folder / "sub").mkdir()
    (folder / "sub" / "creds.txt").write_text("password=hunter2")
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """The demo on a free port: teacher = PyTorch checkpoint, student = its ONNX export."""
    from pgd_deploy.serve.examples import DemoExamples
    from pgd_deploy.serve.gradio_app import serve

    teacher = teacher_checkpoint(tmp_path_factory)
    student = onnx_model(tmp_path_factory, student_checkpoint(tmp_path_factory))
    cfg = ServeConfig(
        port=_free_port(),
        warmup=1,
        max_pixels=2_000_000,
        max_upload_mb=2,
        demo_score=SCORE,  # where the score slider starts
        max_det=15,  # fewer boxes keep the screenshot readable
    )
    models = [DemoModel("teacher", teacher, load_backend(teacher))]
    models.append(DemoModel("student", student, load_backend(student)))
    app = DemoApp(*models, cfg)
    counters = [Counted(m.backend) for m in models]
    examples_dir = _examples_folder(tmp_path_factory.mktemp("user") / "examples")
    examples = DemoExamples(examples_dir, max_pixels=cfg.max_pixels)
    demo = serve(app, examples, block=False)
    try:
        yield demo, app, counters, examples
    finally:
        demo.close()
        examples.close()


def test_binds_localhost_by_default(served) -> None:
    demo, app, _, _ = served
    assert ServeConfig().host == "127.0.0.1"
    assert demo.local_url.startswith(f"http://127.0.0.1:{app.cfg.port}")


def test_client_detect_then_rerender(served, coco128: Path) -> None:
    demo, app, counters, _ = served
    client = gradio_client.Client(demo.local_url, verbose=False)
    (image,) = coco128_images(coco128, 1)
    before = [c.calls for c in counters]
    out = client.predict(gradio_client.handle_file(str(image)), SCORE, 0.6, api_name="/detect")
    t_img, s_img, t_md, s_md, panel, table, details, chart = out
    assert [c.calls for c in counters] == [b + 1 for b in before]
    for path in (t_img, s_img):
        with Image.open(path) as im:
            assert im.format == "PNG" and min(im.size) >= 512  # enlarged for display
    for role in ("teacher", "student"):
        side = details[role]
        assert side["count"] == len(side["detections"]) > 0
        lat = side["latency_ms"]
        assert all(lat[k] > 0 for k in ("pre_ms", "infer_ms", "post_ms", "total_ms"))
        assert lat["total_ms"] == pytest.approx(
            lat["pre_ms"] + lat["infer_ms"] + lat["post_ms"], abs=0.01
        )
        assert side["backend"].startswith({"teacher": "torch", "student": "onnxruntime"}[role])
    assert 0.0 <= details["agreement"] <= 1.0 and details["speedup"] > 0
    assert f"{details['teacher']['count']} detections" in t_md
    assert f"{details['student']['count']} detections" in s_md
    assert "speed-up" in panel and "agreement" in panel
    assert [row[0] for row in table["data"]] == ["teacher", "student"]
    assert chart is not None  # the latency figure
    assert {r["model"] for r in app.history.snapshot()} == {"teacher", "student"}

    # Sliders re-post-process the cached outputs: no model runs, fewer boxes at a higher score.
    high = client.predict(0.9, 0.6, api_name="/rerender")[6]
    assert [c.calls for c in counters] == [b + 1 for b in before]
    assert high["teacher"]["count"] == 0 and high["student"]["count"] == 0
    again = client.predict(SCORE, 0.6, api_name="/rerender")[6]
    assert again["teacher"]["count"] == details["teacher"]["count"]


def test_refused_inputs_get_clear_messages(served, tmp_path: Path) -> None:
    demo, _, _, _ = served
    client = gradio_client.Client(demo.local_url, verbose=False)
    bomb = tmp_path / "bomb.png"
    Image.new("1", (3000, 3000)).save(bomb)  # 9 MP, a few KB on disk
    with pytest.raises(Exception, match="exceeds the limit of 2000000"):
        client.predict(gradio_client.handle_file(str(bomb)), SCORE, 0.6, api_name="/detect")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(Exception, match="not a recognised image format"):
        client.predict(gradio_client.handle_file(str(text)), SCORE, 0.6, api_name="/detect")
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1000, 1000, 3), np.uint8)).save(big)
    assert big.stat().st_size > 2 * 1024 * 1024
    with pytest.raises(Exception, match="(?i)size|large|413"):
        client.predict(gradio_client.handle_file(str(big)), SCORE, 0.6, api_name="/detect")


def _fetch(url: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, b""


def test_only_decoded_copies_of_the_examples_are_served(served) -> None:
    demo, _, _, examples = served
    base = demo.local_url.rstrip("/") + "/gradio_api/file="
    # The --examples folder is not served: it used to be an allowed path, subfolders included.
    for path in ("sub/creds.txt", "notes.txt", "street.png"):
        status, body = _fetch(base + str(examples.source / path))
        assert status in (403, 404) and b"hunter2" not in body, path
    # Only decoded images are copied: 6 built-in ones and street.png (fake.jpg does not decode).
    assert all(p.parent == examples.folder for p in examples.images)
    names = sorted(p.name for p in examples.folder.iterdir())
    assert names == sorted(p.name for p in examples.images) and len(names) == 7
    copy = examples.folder / "example_00_street.png"
    status, body = _fetch(base + str(copy))
    assert status == 200
    with Image.open(io.BytesIO(body)) as im, Image.open(examples.source / "street.png") as orig:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(orig.convert("RGB")))


def test_example_folders_are_removed_on_close_and_after_a_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import subprocess
    import sys
    import tempfile

    from pgd_deploy.serve.examples import DemoExamples

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    stale = tmp_path / f"pgd-serve-examples-{killed.pid}-x1"  # its demo was killed (kill -9)
    stale.mkdir()
    (stale / "shapes_val_00.png").write_bytes(b"left behind")
    running = tmp_path / f"pgd-serve-examples-{os.getpid()}-x2"  # a demo that still runs
    running.mkdir()
    with DemoExamples() as examples:
        assert examples.folder.parent == tmp_path and len(examples.images) == 6
        assert not stale.exists() and running.is_dir()
    assert not examples.folder.exists()
    with pytest.raises(ValueError, match="no readable images"):
        DemoExamples(running)  # an --examples folder without images
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name]  # nothing left over


@pytest.mark.slow
def test_browser_renders_the_demo(served, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    demo, _, _, _ = served
    shot = tmp_path / "demo.png"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.goto(demo.local_url, wait_until="domcontentloaded", timeout=60_000)
            page.get_by_text("teacher vs student").first.wait_for(timeout=60_000)
            for text in ("Score threshold", "NMS IoU", "Examples", "Latency in ms", "Details"):
                page.get_by_text(text).first.wait_for(timeout=30_000)
            page.locator(".gallery-item").first.click()  # the first synthetic example
            page.get_by_text("detections").first.wait_for(timeout=60_000)
            page.get_by_text("speed-up").first.wait_for(timeout=30_000)
            page.locator("#pgd-latency-chart img").first.wait_for(timeout=30_000)
            assert page.locator("img[src*='image.png']").count() >= 2  # both annotated images
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    with Image.open(shot) as im:
        assert im.width >= 1400 and im.height >= 900
