"""`pgd-serve predict --engine ray` (issue 37, part 1) on a local Ray cluster: the same
detections, failures and summary as the local engine over coco128 val with a real ONNX model,
unreadable images reported as rows, and a failed or unverified artifact refused before any actor
starts. Ray runs inside the test (2 CPUs, a small object store, no dashboard) and is always
stopped by it."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_helpers import coco128_images, onnx_model, student_checkpoint

pytest.importorskip("ray.data")
pytest.importorskip("onnxruntime")

from pgd_deploy.serve.command import main  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray for the module's tests, always shut down (also when a test fails)."""
    import ray

    ray.init(
        num_cpus=2,
        object_store_memory=200 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return onnx_model(tmp_path_factory, student_checkpoint(tmp_path_factory))


def _predict(model: Path, source: Path | str, out: Path, *extra: str) -> dict:
    argv = ["predict", "--model", str(model), "--source", str(source), "--out", str(out)]
    assert main([*argv, "--no-progress", "--batch", "4", *extra]) == 0
    return {
        name: json.loads((out / f"{name}.json").read_text())
        for name in ("predictions", "failures", "summary")
    }


def test_ray_gives_exactly_the_local_engines_results(ray_cluster, coco128, model, tmp_path):
    images = coco128_images(coco128, 128)
    local = _predict(model, images[0].parent, tmp_path / "local")
    pool = ["--actors", "2", "--cpus-per-actor", "0.5"]  # two actors and decoding on 2 CPUs
    ray = _predict(model, images[0].parent, tmp_path / "ray", "--engine", "ray", *pool)
    assert ray["predictions"] == local["predictions"]  # same boxes, scores, classes and order
    assert len(local["predictions"]) > 100
    assert ray["failures"] == local["failures"] == []
    for key in ("status", "total", "processed", "succeeded", "failed", "detections"):
        assert ray["summary"][key] == local["summary"][key], key
    assert ray["summary"]["backend"].endswith("on Ray (2 actors)")
    assert set(ray["summary"]["stage_ms"]) == {"pre", "infer", "post", "wait"}
    assert ray_cluster.is_initialized()  # a running Ray is used, and left running


def test_unreadable_images_are_rows_with_their_reason(ray_cluster, coco128, model, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for image in coco128_images(coco128, 3):
        (folder / image.name).symlink_to(image)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(3000))
    Image.new("1", (9000, 5000)).save(folder / "huge.png", optimize=True)  # 45 MP, a few KB
    local = _predict(model, folder, tmp_path / "local")
    ray = _predict(model, folder, tmp_path / "ray", "--engine", "ray")
    assert ray["failures"] == local["failures"]
    reasons = {Path(f["path"]).name: f["error"] for f in ray["failures"]}
    assert sorted(reasons) == ["corrupt.jpg", "empty.jpg", "huge.png"]
    assert "exceeds the limit of 40000000" in reasons["huge.png"]
    assert "empty" in reasons["empty.jpg"] and "corrupt" in reasons["corrupt.jpg"]
    assert ray["predictions"] == local["predictions"]
    assert (ray["summary"]["succeeded"], ray["summary"]["failed"]) == (3, 3)


def test_an_artifact_its_manifest_does_not_vouch_for_is_refused_before_ray(
    ray_cluster, coco128, model, tmp_path, capsys
):
    tampered = tmp_path / model.name
    tampered.write_bytes(model.read_bytes() + b"\0")
    manifest = model.with_name(model.stem + ".manifest.json")
    (tmp_path / manifest.name).write_bytes(manifest.read_bytes())
    source = coco128_images(coco128, 1)[0].parent
    argv = ["predict", "--model", str(tampered), "--source", str(source), "--engine", "ray"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "sha256" in capsys.readouterr().err
    assert not (tmp_path / "out" / "predictions.json").exists()  # refused before any work
    argv = ["predict", "--model", str(model), "--source", str(source), "--engine", "ray"]
    assert main([*argv, "--out", str(tmp_path / "y"), "--actors", "2"]) == 2  # would wait forever
    assert "leave no room for the decode tasks" in capsys.readouterr().err


def test_uri_sources_and_saved_images_match_the_local_engine(ray_cluster, coco128, model, tmp_path):
    """A list of file:// URIs (opened through pyarrow.fs, as s3:// ones are) with a missing
    object, and a folder URI: the local engine's detections and failures; --save-images writes
    the local engine's files, byte for byte."""
    import shutil

    folder = tmp_path / "in"
    folder.mkdir()
    for image in coco128_images(coco128, 6):
        shutil.copy(image, folder / image.name)
    uris = [p.as_uri() for p in sorted(folder.iterdir())] + [folder.as_uri() + "/gone.jpg"]
    listing = tmp_path / "uris.txt"
    listing.write_text("\n".join(uris) + "\n")
    local = _predict(model, listing, tmp_path / "local", "--save-images")
    ray = _predict(model, listing, tmp_path / "ray", "--engine", "ray", "--save-images")
    assert ray["predictions"] == local["predictions"] and len(local["predictions"]) > 6
    assert ray["failures"] == local["failures"]
    assert [f["path"] for f in ray["failures"]] == [uris[-1]]
    assert "no such object" in ray["failures"][0]["error"]
    drawn = {p.name: p.read_bytes() for p in (tmp_path / "local" / "images").iterdir()}
    assert len(drawn) == 6
    assert {p.name: p.read_bytes() for p in (tmp_path / "ray" / "images").iterdir()} == drawn
    assert ray["summary"]["save_errors"] == 0
    whole = _predict(model, folder.as_uri() + "/", tmp_path / "uri", "--engine", "ray")
    assert whole["predictions"] == local["predictions"]  # the same image ids, from the names


def _outputs(out: Path) -> tuple[list, list]:
    return tuple(json.loads((out / f"{n}.json").read_text()) for n in ("predictions", "failures"))


def test_a_driver_killed_mid_run_loses_and_repeats_nothing_on_rerun(
    ray_cluster, coco128, model, tmp_path
):
    """kill -9 of the driver (joined to this test's Ray) after a few shards; the rerun into the
    same --out finishes the rest: exactly the images and detections of an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "in"
    folder.mkdir()
    for image in coco128_images(coco128, 64):
        (folder / image.name).symlink_to(image)
    (folder / "empty.jpg").write_bytes(b"")  # a failure row survives the kill too
    clean = _predict(model, folder, tmp_path / "clean", "--engine", "ray")
    out = tmp_path / "killed"
    address = ray_cluster.get_runtime_context().gcs_address
    argv = ["predict", "--model", str(model), "--source", str(folder), "--out", str(out)]
    argv += ["--engine", "ray", "--address", address, "--batch", "2", "--no-progress"]
    code = "import sys; from pgd_deploy.cli import serve_main; sys.exit(serve_main(sys.argv[1:]))"
    driver = subprocess.Popen([sys.executable, "-c", code, *argv])
    shards = out / "shards"
    deadline = time.monotonic() + 240
    while len(list(shards.glob("part-*.jsonl"))) < 3 and driver.poll() is None:
        assert time.monotonic() < deadline, "the driver wrote no shards"
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    written = len(list(shards.glob("part-*.jsonl")))
    assert 3 <= written < 33, written  # killed mid-run: some shards, not all (65 images, 2 each)
    resumed = _predict(model, folder, out, "--engine", "ray")
    assert _outputs(out) == (clean["predictions"], clean["failures"])
    assert resumed["summary"]["processed"] == resumed["summary"]["total"] == 65
    assert 6 <= resumed["summary"]["resumed"] < 65  # the killed run's shards, not redone
    assert resumed["summary"]["succeeded"] == 64 and resumed["summary"]["failed"] == 1
    indices = [json.loads(line)["index"] for s in shards.glob("*.jsonl") for line in s.open()]
    assert sorted(indices) == list(range(65))  # each image in exactly one shard
    again = _predict(model, folder, out, "--engine", "ray")  # nothing left: nothing redone
    assert _outputs(out) == (clean["predictions"], clean["failures"])
    assert again["summary"]["processed"] == again["summary"]["resumed"] == 65
    assert again["summary"]["images_per_second"] == 0.0  # nothing served by this run
    other = _predict(model, folder, out, "--engine", "ray", "--score-thresh", "0.5")
    assert len(other["predictions"]) < len(clean["predictions"])  # another run: shards replaced
    assert all(p["score"] >= 0.5 for p in other["predictions"])


def _actor_pids() -> list[int]:
    """The processes of this machine's inference actors (Ray names them by their class)."""
    pids = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if (
                entry.name.isdigit()
                and b"MapBatches(InferActor)" in (entry / "cmdline").read_bytes()
            ):
                pids.append(int(entry.name))
    return pids


def test_an_actor_killed_mid_run_loses_and_repeats_nothing(ray_cluster, coco128, model, tmp_path):
    """kill -9 of the inference actor after a few shards: Ray Data restarts it and retries its
    batch, and the run ends with exactly the images and detections of an uninterrupted run."""
    import signal
    import threading
    import time

    folder = tmp_path / "in"
    folder.mkdir()
    for image in coco128_images(coco128, 40):
        (folder / image.name).symlink_to(image)
    clean = _predict(model, folder, tmp_path / "clean", "--engine", "ray", "--batch", "2")
    out, killed = tmp_path / "killed", []

    def kill_the_actor_after_two_shards() -> None:
        deadline = time.monotonic() + 240
        while len(list((out / "shards").glob("part-*.jsonl"))) < 2:
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        killed.append(len(list((out / "shards").glob("part-*.jsonl"))))
        for pid in _actor_pids():
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_the_actor_after_two_shards, daemon=True)
    killer.start()
    run = _predict(model, folder, out, "--engine", "ray", "--batch", "2")
    killer.join(timeout=10)
    assert len(killed) >= 2 and killed[0] < 20, killed  # killed mid-run (20 batches in all)
    assert run["summary"]["status"] == "done" and run["summary"]["processed"] == 40
    assert _outputs(out) == (clean["predictions"], clean["failures"])
    indices = [
        json.loads(line)["index"] for s in (out / "shards").glob("*.jsonl") for line in s.open()
    ]
    assert sorted(indices) == list(range(40))  # each image in exactly one shard


def _driver_peak_rss_mb(ray_cluster, model: Path, source: Path, out: Path) -> float:
    """Peak RSS of a `pgd-serve predict --engine ray` driver process joined to the test's Ray."""
    import subprocess
    import sys

    address = ray_cluster.get_runtime_context().gcs_address
    argv = ["predict", "--model", str(model), "--source", str(source), "--out", str(out)]
    argv += ["--engine", "ray", "--address", address, "--batch", "8", "--no-progress"]
    argv += ["--score-thresh", "0.4"]  # few candidates: the NMS of thousands would take minutes
    code = (  # the driver's own high-water mark (ru_maxrss of a child counts its parent's pages)
        "import re, sys; from pgd_deploy.cli import serve_main; code = serve_main(sys.argv[1:]); "
        "print('VmHWM', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]); "
        "sys.exit(code)"
    )
    driver = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=600
    )
    assert driver.returncode == 0, driver.stderr[-2000:]
    return int(driver.stdout.split("VmHWM")[-1]) / 1024  # KiB


def test_two_thousand_images_finish_in_bounded_driver_memory(ray_cluster, model, tmp_path):
    """2,000 small images: the driver holds indices, not images or detections (its peak memory
    grows by less than the tensors of 200 of them over a run of 200), and every image is in the
    outputs once."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2000):
        pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i + 1}.jpg", quality=80)
    few = tmp_path / "few.txt"
    few.write_text("".join(f"{folder}/{i + 1}.jpg\n" for i in range(200)))
    small = _driver_peak_rss_mb(ray_cluster, model, few, tmp_path / "few")
    large = _driver_peak_rss_mb(ray_cluster, model, folder, tmp_path / "all")
    _, failures = _outputs(tmp_path / "all")
    summary = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert failures == [] and summary["succeeded"] == summary["processed"] == 2000
    shards = (tmp_path / "all" / "shards").glob("*.jsonl")
    assert sorted(json.loads(line)["image_id"] for s in shards for line in s.open()) == list(
        range(1, 2001)
    )
    tensors_mb = 1800 * 3 * 128 * 128 * 4 / 2**20  # what the extra 1,800 inputs are, decoded
    print(f"driver peak RSS: {small:.0f} MB (200 images), {large:.0f} MB (2,000)")
    assert large - small < tensors_mb / 4, (small, large)


def test_an_actor_serving_onnx_imports_no_torch(ray_cluster, coco128, model):
    """What an inference actor runs for an ONNX artifact (open it, decode a batch, infer,
    post-process), in a fresh Ray worker process: torch is never imported."""

    @ray_cluster.remote(max_calls=1)  # a worker process of its own, discarded afterwards
    def probe(artifact: str, image: str) -> tuple[int, list[str]]:
        import sys

        import numpy as np

        from pgd_deploy.serve.ray_stages import InferActor, decode_batch

        actor = InferActor(
            artifact, device="cpu", allow_unverified=False, overrides={}, category_ids=[1, 2, 3]
        )
        batch = {"index": np.array([0]), "path": np.array([image]), "image_id": np.array([7])}
        decoded = decode_batch(batch, input_size=actor.backend.input_size, max_pixels=None)
        out = actor(decoded)
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        return int(out["detections"][0]), loaded

    image = str(coco128_images(coco128, 1)[0])
    detections, torch_modules = ray_cluster.get(probe.remote(str(model), image))
    assert detections > 0 and torch_modules == []
