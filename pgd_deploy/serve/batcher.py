"""Decode and letterbox in worker threads while the model runs; hand out in-order batches.

`OrderedPrefetcher` maps a function over items on a thread pool with at most `max_pending`
items submitted but not yet consumed (the bounded queue), and yields the results in input order.
PIL decoding, resizing and numpy normalisation release the GIL, so threads overlap with inference
without the pickling cost of processes.

`iter_batches` groups the loaded items into `ImageBatch`es of up to `batch_size` successfully
decoded images; items that failed (missing, empty, corrupt, truncated, not an image, too many
pixels, timed out) travel with the batch as failures and never stop the run.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from pgd_deploy.runtime.preprocess import ImageDecodeError, ImageTransform, letterbox
from pgd_deploy.serve.sources import SourceItem, load_source_image

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class LoadedItem:
    """One input after decoding and letterboxing (or its failure).

    Attributes:
        item: the source entry.
        tensor: float32 [3, H, W] network input, None on failure.
        transform: network -> original pixel mapping, None on failure.
        image: the decoded uint8 RGB image [h, w, 3] when kept (for drawing), else None.
        error: why the item failed, None on success.
        seconds: wall time spent decoding and letterboxing in the worker.
    """

    item: SourceItem
    tensor: np.ndarray | None = None
    transform: ImageTransform | None = None
    image: np.ndarray | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class ImageBatch:
    """Consecutive inputs: the decoded ones stacked for one `infer` call, plus the failures.

    Attributes:
        items: successfully loaded items, in input order.
        failures: items that failed, in input order (they precede or sit among `items`).
        images: float32 [B, 3, H, W] with B = len(items), or None when B == 0.
        transforms: one per item.
        wait_seconds: time the consumer waited for this batch's inputs (0 when the workers
            kept ahead of the model).
    """

    items: list[LoadedItem]
    failures: list[LoadedItem]
    images: np.ndarray | None
    transforms: list[ImageTransform]
    wait_seconds: float = 0.0

    @property
    def preprocess_seconds(self) -> float:
        return sum(it.seconds for it in self.items) + sum(it.seconds for it in self.failures)


def load_item(
    item: SourceItem,
    input_size: Sequence[int],
    *,
    max_pixels: int | None,
    keep_image: bool = False,
) -> LoadedItem:
    """Decode one file and letterbox it to `input_size`; failures are returned, not raised."""
    t0 = time.perf_counter()
    try:
        image = load_source_image(item.path, max_pixels=max_pixels)
        tensor, transform = letterbox(image, input_size)
    except ImageDecodeError as err:
        return LoadedItem(item, error=str(err), seconds=time.perf_counter() - t0)
    except (OSError, MemoryError) as err:  # e.g. permission denied, a file too large to hold
        return LoadedItem(
            item,
            error=f"{item.path}: {type(err).__name__}: {err}",
            seconds=time.perf_counter() - t0,
        )
    return LoadedItem(
        item,
        tensor=tensor,
        transform=transform,
        image=image if keep_image else None,
        seconds=time.perf_counter() - t0,
    )


class ItemTimeout(Exception):
    """A worker did not finish one item within the timeout."""


@dataclass
class _Task:
    future: cf.Future
    started: list[float]  # the worker appends its start time


class OrderedPrefetcher(Generic[T, R]):
    """`fn` over `items` on `workers` threads, results in input order, at most `max_pending`
    items submitted and not yet consumed.

    Iterating yields `(item, result)` pairs; a result is `ItemTimeout` (an exception instance,
    not raised) when the call ran longer than `timeout` seconds. Exceptions raised by `fn`
    propagate to the consumer. Use as a context manager (or call `close`) so that pending work
    is cancelled when the consumer stops early.

    Args:
        fn: the per-item function (thread-safe).
        items: the inputs, consumed lazily.
        workers: threads (>= 1).
        max_pending: queue bound, items (>= 1).
        timeout: per-item limit in seconds, counted from when a worker starts the item; None
            waits forever. A timed-out worker thread cannot be killed: it finishes in the
            background while the run moves on.
    """

    def __init__(
        self,
        fn: Callable[[T], R],
        items: Iterable[T],
        *,
        workers: int,
        max_pending: int,
        timeout: float | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if max_pending < 1:
            raise ValueError(f"max_pending (queue size) must be >= 1, got {max_pending}")
        self.fn = fn
        self.items = iter(items)
        self.max_pending = max_pending
        self.timeout = timeout
        self.pool = cf.ThreadPoolExecutor(workers, thread_name_prefix="pgd-load")
        self.pending: deque[tuple[T, _Task]] = deque()
        self.in_flight_peak = 0  # the most items ever submitted and not consumed

    def _run(self, started: list[float], item: T) -> R:
        started.append(time.perf_counter())
        return self.fn(item)

    def _fill(self) -> None:
        while len(self.pending) < self.max_pending:
            try:
                item = next(self.items)
            except StopIteration:
                return
            started: list[float] = []
            task = _Task(self.pool.submit(self._run, started, item), started)
            self.pending.append((item, task))
            self.in_flight_peak = max(self.in_flight_peak, len(self.pending))

    def _wait(self, task: _Task) -> R | ItemTimeout:
        while True:
            if self.timeout is None or task.future.done():
                return task.future.result()
            if task.started:
                left = task.started[0] + self.timeout - time.perf_counter()
                if left <= 0:
                    task.future.cancel()
                    return ItemTimeout(f"no result after {self.timeout:g} s")
            else:
                left = self.timeout  # not started yet: workers are busy with earlier items
            cf.wait([task.future], timeout=min(left, 0.5))

    def __iter__(self) -> Iterator[tuple[T, R | ItemTimeout]]:
        self._fill()
        while self.pending:
            item, task = self.pending.popleft()
            result = self._wait(task)
            yield item, result
            self._fill()  # after the consumer is done with `item`: at most max_pending alive

    def close(self) -> None:
        """Cancel work not yet started; do not wait for running items."""
        for _, task in self.pending:
            task.future.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> OrderedPrefetcher[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stack(items: list[LoadedItem]) -> np.ndarray:
    return np.stack([it.tensor for it in items])  # [B, 3, H, W]


def iter_batches(
    items: Sequence[SourceItem],
    load: Callable[[SourceItem], LoadedItem],
    *,
    batch_size: int,
    workers: int,
    queue_size: int,
    timeout: float | None = 60.0,
) -> Iterator[ImageBatch]:
    """Load `items` in worker threads; yield in-order `ImageBatch`es of up to `batch_size` images.

    Args:
        items: the inputs.
        load: decodes and letterboxes one item (e.g. `functools.partial(load_item, ...)`).
        batch_size: decoded images per batch (>= 1).
        workers: loader threads (>= 1).
        queue_size: most items loaded or loading ahead of the consumer (>= 1; raised to
            `batch_size` so that a full batch can form).
        timeout: per-item decode limit in seconds (None = no limit).

    Raises:
        ValueError: a non-positive batch size, worker count or queue size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if queue_size < 1:
        raise ValueError(f"queue_size must be >= 1, got {queue_size}")
    prefetch = OrderedPrefetcher(
        load, items, workers=workers, max_pending=max(queue_size, batch_size), timeout=timeout
    )
    ok: list[LoadedItem] = []
    failed: list[LoadedItem] = []
    waited = 0.0
    with prefetch:
        t0 = time.perf_counter()
        for item, result in prefetch:
            if isinstance(result, ItemTimeout):
                result = LoadedItem(item, error=f"{item.path}: decoding timed out ({result})")
            (ok if result.ok else failed).append(result)
            if len(ok) == batch_size:
                waited += time.perf_counter() - t0
                yield ImageBatch(ok, failed, _stack(ok), [it.transform for it in ok], waited)
                ok, failed, waited = [], [], 0.0
                t0 = time.perf_counter()
        if ok or failed:
            waited += time.perf_counter() - t0
            images = _stack(ok) if ok else None
            yield ImageBatch(ok, failed, images, [it.transform for it in ok], waited)
