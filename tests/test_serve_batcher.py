"""Tests of pgd_deploy.serve.batcher: order, the bounded queue, failures, timeouts, batching."""

from __future__ import annotations

import functools
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pgd_deploy.serve.batcher import (
    ItemTimeout,
    LoadedItem,
    OrderedPrefetcher,
    iter_batches,
    load_item,
)
from pgd_deploy.serve.sources import SourceItem


def _items(paths: list[Path]) -> list[SourceItem]:
    return [SourceItem(i, p, p.name, i + 1) for i, p in enumerate(paths)]


def test_prefetcher_keeps_input_order_with_random_delays() -> None:
    rng = random.Random(0)
    delays = [rng.uniform(0, 0.01) for _ in range(60)]

    def work(i: int) -> int:
        time.sleep(delays[i])
        return i * i

    with OrderedPrefetcher(work, range(60), workers=4, max_pending=8) as pre:
        out = list(pre)
    assert out == [(i, i * i) for i in range(60)]


def test_prefetcher_queue_is_bounded_when_the_consumer_is_slow() -> None:
    lock = threading.Lock()
    started = 0
    consumed = 0
    ahead = []  # started but not consumed, seen by each worker when it starts

    def work(i: int) -> int:
        nonlocal started
        with lock:
            started += 1
            ahead.append(started - consumed)
        return i

    with OrderedPrefetcher(work, range(40), workers=3, max_pending=5) as pre:
        for _ in pre:
            time.sleep(0.005)  # a slow model
            with lock:
                consumed += 1
        assert pre.in_flight_peak == 5
    assert max(ahead) <= 5
    assert started == 40


def test_prefetcher_propagates_exceptions() -> None:
    def work(i: int) -> int:
        if i == 3:
            raise RuntimeError("boom")
        return i

    with OrderedPrefetcher(work, range(10), workers=2, max_pending=4) as pre:
        it = iter(pre)
        assert [next(it)[1] for _ in range(3)] == [0, 1, 2]
        with pytest.raises(RuntimeError, match="boom"):
            next(it)


def test_prefetcher_times_out_a_stuck_item_and_moves_on() -> None:
    release = threading.Event()

    def work(i: int) -> int:
        if i == 1:
            release.wait(5.0)  # a decode that hangs (e.g. a stalled network mount)
        return i

    t0 = time.perf_counter()
    with OrderedPrefetcher(work, range(4), workers=2, max_pending=4, timeout=0.3) as pre:
        out = list(pre)
    elapsed = time.perf_counter() - t0
    release.set()
    assert [i for i, _ in out] == [0, 1, 2, 3]
    assert isinstance(out[1][1], ItemTimeout)
    assert [r for i, r in out if i != 1] == [0, 2, 3]
    assert elapsed < 3.0


def test_prefetcher_timeout_counts_from_start_not_from_queueing() -> None:
    # One worker, every item takes 0.1 s, timeout 0.6 s: the last item waits about 1.1 s in the
    # queue before it starts, which must not count against it.
    def work(i: int) -> int:
        time.sleep(0.1)
        return i

    with OrderedPrefetcher(work, range(12), workers=1, max_pending=12, timeout=0.6) as pre:
        out = [r for _, r in pre]
    assert out == list(range(12))


def test_prefetcher_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="workers must be >= 1"):
        OrderedPrefetcher(abs, [], workers=0, max_pending=1)
    with pytest.raises(ValueError, match="max_pending"):
        OrderedPrefetcher(abs, [], workers=1, max_pending=0)


def _images(tmp_path: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        path = tmp_path / f"{i:03d}.png"
        h, w = 20 + i, 30 + 2 * i
        Image.fromarray(np.full((h, w, 3), i, np.uint8)).save(path)
        paths.append(path)
    return paths


def test_iter_batches_forms_in_order_batches_with_failures(tmp_path: Path) -> None:
    paths = _images(tmp_path, 7)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    paths.insert(3, tmp_path / "bad.png")
    paths.append(tmp_path / "missing.png")
    load = functools.partial(load_item, input_size=(32, 32), max_pixels=None)
    batches = list(iter_batches(_items(paths), load, batch_size=3, workers=2, queue_size=4))
    assert [[it.item.index for it in b.items] for b in batches] == [[0, 1, 2], [4, 5, 6], [7]]
    assert [[f.item.index for f in b.failures] for b in batches] == [[], [3], [8]]
    assert "not a recognised image format" in batches[1].failures[0].error
    assert "file not found" in batches[2].failures[0].error
    first = batches[0]
    assert first.images.shape == (3, 3, 32, 32) and first.images.dtype == np.float32
    assert [(t.orig_h, t.orig_w) for t in first.transforms] == [(20, 30), (21, 32), (22, 34)]
    assert first.preprocess_seconds > 0


def test_iter_batches_all_failed_yields_failures_without_images(tmp_path: Path) -> None:
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    load = functools.partial(load_item, input_size=(32, 32), max_pixels=None)
    (batch,) = iter_batches(_items(paths), load, batch_size=4, workers=1, queue_size=2)
    assert batch.items == [] and batch.images is None and len(batch.failures) == 2


def test_load_item_refuses_too_many_pixels_and_keeps_image_on_request(tmp_path: Path) -> None:
    (path,) = _images(tmp_path, 1)
    item = SourceItem(0, path, path.name, 1)
    refused = load_item(item, (32, 32), max_pixels=100)
    assert not refused.ok and "exceeds the limit of 100" in refused.error
    kept = load_item(item, (32, 32), max_pixels=None, keep_image=True)
    assert kept.ok and kept.image.shape == (20, 30, 3) and kept.tensor.shape == (3, 32, 32)
    assert load_item(item, (32, 32), max_pixels=None).image is None


def test_iter_batches_stops_loading_when_the_consumer_stops(tmp_path: Path) -> None:
    calls = []

    def load(item: SourceItem) -> LoadedItem:
        calls.append(item.index)
        return LoadedItem(item, tensor=np.zeros((3, 4, 4), np.float32), transform=None)

    items = [SourceItem(i, tmp_path / f"{i}", str(i), i) for i in range(1000)]
    gen = iter_batches(items, load, batch_size=2, workers=2, queue_size=6)
    next(gen)
    gen.close()
    time.sleep(0.1)
    assert len(calls) <= 10  # the queue bound, not the whole source


def test_iter_batches_validates_sizes() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        next(iter_batches([], load_item, batch_size=0, workers=1, queue_size=1))
    with pytest.raises(ValueError, match="queue_size"):
        next(iter_batches([], load_item, batch_size=1, workers=1, queue_size=0))
