"""`pgd-serve predict`: batch inference over a source, written incrementally.

Outputs under the output folder:
    predictions.json   COCO results (image_id, category_id of the training dataset, xywh bbox,
                       score); a valid JSON array after every batch and after a failed write
                       (a full disk), so an interrupted run (Ctrl-C), a crash or a full disk
                       leaves what was done (`outputs.JsonArrayWriter`)
    failures.json      [{"index", "path", "image_id", "error"}] for inputs that could not be used
    images/            annotated copies (with `save_images`), names derived safely from the
                       inputs, each written atomically (never a truncated JPEG)
    summary.json       `status` (running, done, interrupted, failed), `error`, counts, per-stage
                       milliseconds per image, images/s, metrics, and `warnings`: the checks a
                       model served anyway failed (`runtime.verify`)

Decoding and letterboxing run in worker threads ahead of the model (`batcher`); inference and
post-processing run in the calling thread and are timed with `runtime.timing.StageTimer`, the
same code as the benchmark.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pgd_deploy.io_utils import WriteError, write_json
from pgd_deploy.metrics import detections_to_coco
from pgd_deploy.metrics import evaluate as evaluate_metrics
from pgd_deploy.runtime.backends import Backend
from pgd_deploy.runtime.timing import StageTimer
from pgd_deploy.serve.batcher import ImageBatch, iter_batches, load_item
from pgd_deploy.serve.outputs import (
    FAILURES_NAME,
    METRICS_NAME,
    RESULTS_NAME,
    SUMMARY_NAME,
    RunOutputs,
    SummaryFile,
)
from pgd_deploy.serve.sources import Source

logger = logging.getLogger(__name__)


@dataclass
class PredictSummary:
    """What a `run_predict` call did.

    Attributes:
        total: inputs in the source.
        processed: inputs handled (succeeded + failed); less than `total` when interrupted.
        succeeded, failed: inputs that were / could not be run.
        detections: detections written.
        seconds: wall time from the first input to the last result.
        stage_ms: per successful image: "pre" (decode + letterbox, in the workers), "infer",
            "post", and "wait" (time the model waited for inputs).
        interrupted: stopped by Ctrl-C.
        metrics: COCO metrics when evaluated, else None.
        warnings: the checks the model failed and was served despite (`--allow-unverified`,
            `--allow-failed`; `runtime.verify`); empty when it was verified.
        error: why the run stopped early (a failed write: the file and the free space).
        resumed: inputs done by an earlier run into the same --out and not redone (Ray).
        decoded: images this run served itself, when not all `succeeded` are (Ray).
    """

    total: int
    processed: int = 0
    succeeded: int = 0
    failed: int = 0
    detections: int = 0
    seconds: float = 0.0
    stage_ms: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
    out_dir: str = ""
    backend: str = ""
    metrics: dict[str, float] | None = None
    save_errors: int = 0
    warnings: list[str] = field(default_factory=list)
    error: str = ""
    resumed: int = 0
    decoded: int | None = None

    @property
    def images_per_second(self) -> float:
        """Images this run decoded and served per second of its wall time (a resumed run's
        earlier images are not counted)."""
        images = self.succeeded if self.decoded is None else self.decoded
        return images / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 unless every input handled failed (130 after Ctrl-C)."""
        if self.interrupted:
            return 130
        return 1 if self.processed and not self.succeeded else 0

    @property
    def status(self) -> str:
        """ "failed" (a write failed), "interrupted" (Ctrl-C) or "done"; summary.json says
        "running" while the run goes on (and after a kill)."""
        return "failed" if self.error else "interrupted" if self.interrupted else "done"

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            **asdict(self),
            "images_per_second": self.images_per_second,
        }


def format_summary(summary: PredictSummary) -> str:
    """The closing table printed by `pgd-serve predict`."""
    ms = summary.stage_ms
    rows = [
        ("backend", summary.backend),
        ("images", f"{summary.succeeded} ok / {summary.processed} of {summary.total}"),
        ("failures", f"{summary.failed}" + (f" (see {FAILURES_NAME})" if summary.failed else "")),
        ("detections", f"{summary.detections}"),
        (
            "ms / image",
            " ".join(f"{k} {ms.get(k, 0.0):.2f}" for k in ("pre", "infer", "post", "wait")),
        ),
        ("images / s", f"{summary.images_per_second:.2f} ({summary.seconds:.2f} s wall)"),
        ("output", summary.out_dir),
    ]
    if summary.warnings:
        failed = f"{len(summary.warnings)} check(s) failed, see 'warnings' in {SUMMARY_NAME}"
        rows.insert(0, ("model", f"NOT VERIFIED, served anyway ({failed})"))
    if summary.resumed:
        rows.insert(2, ("resumed", f"{summary.resumed} inputs done by an earlier run, kept"))
    if summary.interrupted:
        rows.insert(0, ("status", "INTERRUPTED: outputs hold the inputs done so far"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _same_name(a: str, b: str) -> bool:
    """ "traffic light" = "Traffic_Light" = "traffic-light"."""
    norm = lambda s: " ".join(str(s).replace("_", " ").replace("-", " ").lower().split())
    return norm(a) == norm(b)


def check_evaluable(
    source: Source, category_ids: Sequence[int], class_names: Sequence[str] = ()
) -> None:
    """`--eval` needs a COCO source whose categories include the model's, under the same names
    (a shapes model's ids 1-3 exist in COCO too, as person, bicycle, car: an AP of 0.0 without a
    word). Default names ("0", "1", ...) say nothing and are not compared.

    Raises:
        ValueError: not a COCO JSON source, category ids the annotations do not have, or ids
            whose names differ (the message lists both).
    """
    if source.annotations is None:
        raise ValueError(
            f"--eval needs a COCO annotation JSON as --source, got a {source.kind} source "
            f"({source.spec})"
        )
    unknown = sorted(set(category_ids) - set(source.annotations.category_ids))
    if unknown:
        raise ValueError(
            f"{source.spec}: field 'categories' lacks the model's category ids {unknown[:10]} "
            "(was the model trained on another label set?)"
        )
    if list(class_names) == [str(i) for i in range(len(class_names))]:
        return
    theirs = dict(zip(source.annotations.category_ids, source.annotations.class_names))
    differ = [
        (cid, mine, theirs[cid])
        for cid, mine in zip(category_ids, class_names)
        if not _same_name(mine, theirs[cid])
    ]
    if differ:
        shown = ", ".join(f"{cid}: {mine!r} vs {other!r}" for cid, mine, other in differ[:10])
        raise ValueError(
            f"{source.spec}: the model's category ids name other classes in these annotations "
            f"(id: model vs annotations: {shown}{', ...' if len(differ) > 10 else ''}), so "
            f"--eval would score detections against the wrong objects (AP near 0). The model's "
            f"classes: {list(class_names)[:20]}; the annotations': "
            f"{[theirs[c] for c in category_ids][:20]}. Evaluate on the dataset it was trained on"
        )


def _progress(total: int, enabled: bool) -> tuple[Any, Any]:
    """(tqdm bar or None, context manager that routes log lines above the bar)."""
    if not enabled:
        return None, contextlib.nullcontext()
    try:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:
        logger.info("install tqdm for a progress bar: pip install 'pgd-deploy[serve]'")
        return None, contextlib.nullcontext()
    bar = tqdm(total=total, unit="img", dynamic_ncols=True, smoothing=0.1)
    return bar, logging_redirect_tqdm()


def _run_batch(
    backend: Backend,
    batch: ImageBatch,
    *,
    timer: StageTimer,
    outputs: RunOutputs,
    category_ids: Sequence[int],
    overrides: dict[str, float],
) -> int:
    """Infer, post-process and write one batch; returns the number of detections."""
    outputs.add_failures(batch.failures)
    if batch.images is None:
        return 0
    with timer.stage("infer"):
        raw = backend.infer(batch.images)
    with timer.stage("post"):
        dets = backend.postprocess(raw, batch.transforms, **overrides)
    entries: list[dict[str, Any]] = []
    for loaded, det in zip(batch.items, dets):
        entries.extend(detections_to_coco(loaded.item.image_id, det, category_ids))
        if outputs.saver is not None:
            outputs.saver.submit(loaded, det)
    outputs.results.extend(entries)
    return len(entries)


def _record(summary: PredictSummary, batch: ImageBatch, timer: StageTimer, n_dets: int) -> None:
    summary.processed += len(batch.items) + len(batch.failures)
    summary.succeeded += len(batch.items)
    summary.failed += len(batch.failures)
    summary.detections += n_dets
    timer.totals["pre"] = timer.totals.get("pre", 0.0) + batch.preprocess_seconds
    timer.totals["wait"] = timer.totals.get("wait", 0.0) + batch.wait_seconds


def run_predict(
    backend: Backend,
    source: Source,
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    workers: int = 2,
    queue_size: int = 32,
    score_thresh: float | None = None,
    nms_thresh: float | None = None,
    max_det: int | None = None,
    max_pixels: int | None = 40_000_000,
    decode_timeout: float | None = 60.0,
    save_images: bool = False,
    draw_score: float = 0.3,
    evaluate: bool = False,
    metric: str | None = None,
    progress: bool = True,
) -> PredictSummary:
    """Run `backend` over every input of `source`, writing results under `out_dir`.

    Args:
        backend: an opened artifact (`runtime.backends.load_backend`).
        source: the inputs (`serve.sources.resolve_source`).
        out_dir: output folder (created); see the module docstring for its files.
        batch_size, workers, queue_size: see `serve.batcher.iter_batches`; the batch size is
            capped at the backend's maximum.
        score_thresh, nms_thresh, max_det: post-processing overrides (None = the artifact's).
        max_pixels: decode limit per image (decompression bombs become failures).
        decode_timeout: seconds one image may take to decode.
        save_images: also write annotated images, drawing detections >= `draw_score`.
        evaluate: compute metrics over the handled images (COCO JSON sources only).
        metric: "coco" or "crowd" (`metrics.evaluate`); None = the model's (`backend.metric`,
            its training data's `data.metric`).
        progress: show a tqdm progress bar.

    Returns:
        The summary; Ctrl-C ends the run early with `interrupted=True` and valid outputs.

    Raises:
        ValueError: `evaluate` with a source that cannot be evaluated.
        WriteError: an output could not be written (a full disk): predictions.json and
            failures.json hold the inputs done before it, and summary.json (its room is taken
            when the run starts) says why the run stopped: `status` "failed", `error`.
    """
    # The backend filled in missing ids (`labels.class_labels`). Without any class list, the
    # same label + 1 convention, for any label.
    category_ids = backend.category_ids
    if evaluate:
        check_evaluable(source, category_ids, backend.class_names)
    category_ids = category_ids or range(1, 1 << 31)
    out_dir = Path(out_dir)
    thresholds = {"score_thresh": score_thresh, "nms_thresh": nms_thresh, "max_det": max_det}
    load = functools.partial(
        load_item, input_size=backend.input_size, max_pixels=max_pixels, keep_image=save_images
    )
    batches = iter_batches(
        source.items,
        load,
        batch_size=max(1, min(batch_size, backend.max_batch)),
        workers=workers,
        queue_size=queue_size,
        timeout=decode_timeout,
    )
    summary = PredictSummary(
        total=len(source),
        out_dir=str(out_dir),
        backend=backend.describe(),
        warnings=list(backend.warnings),
    )
    outputs = RunOutputs(out_dir, backend, save_images, draw_score)
    summary_file = SummaryFile(out_dir / SUMMARY_NAME, {**summary.to_dict(), "status": "running"})
    step = functools.partial(
        _run_batch,
        backend,
        outputs=outputs,
        category_ids=category_ids,
        overrides={k: v for k, v in thresholds.items() if v is not None},
    )
    try:
        _run_all(batches, step, summary, outputs, backend, progress)
    except Exception as err:  # e.g. a full disk: what was written stays valid; say why it stopped
        summary.error = str(err) or type(err).__name__
        logger.error("stopped after %d inputs: %s", summary.processed, err)
        try:
            summary_file.record(summary.to_dict())
        except WriteError as again:
            logger.error("%s", again)
        raise
    if evaluate and summary.processed:
        summary.metrics = _evaluate(source, out_dir, summary.processed, metric or backend.metric)
    summary_file.write(summary.to_dict())
    return summary


def _run_all(
    batches: Any,
    step: Callable[..., int],
    summary: PredictSummary,
    outputs: RunOutputs,
    backend: Backend,
    progress: bool,
) -> None:
    """Run `step` over every batch with a stage timer, then close the loader and the outputs
    whatever happened; the summary gets the time, the interruption and the per-stage means."""
    timer = StageTimer(sync=backend.sync)
    start = time.perf_counter()
    try:
        timed = functools.partial(step, timer=timer)
        summary.interrupted = not _consume(batches, timed, summary, timer, progress)
    finally:
        summary.seconds = time.perf_counter() - start
        batches.close()  # stops the loader threads
        summary.save_errors = outputs.close()
    summary.stage_ms = timer.per_image_ms(summary.succeeded)


def _consume(
    batches: Iterator[ImageBatch],
    step: Callable[[ImageBatch], int],
    summary: PredictSummary,
    timer: StageTimer,
    progress: bool,
) -> bool:
    """Run `step` on every batch with a progress bar; False when interrupted by Ctrl-C."""
    bar, redirect = _progress(summary.total, progress)
    try:
        with redirect:
            for batch in batches:
                _record(summary, batch, timer, step(batch))
                if bar is not None:
                    bar.update(len(batch.items) + len(batch.failures))
                    bar.set_postfix(dets=summary.detections, failed=summary.failed, refresh=False)
    except KeyboardInterrupt:
        logger.warning("interrupted: keeping the %d inputs done", summary.processed)
        return False
    finally:
        if bar is not None:
            bar.close()
    return True


def _evaluate(source: Source, out_dir: Path, processed: int, metric: str) -> dict[str, float]:
    """The metrics over the first `processed` inputs (all of them unless interrupted); inputs
    that failed count as images without detections."""
    assert source.annotations is not None
    results = json.loads((out_dir / RESULTS_NAME).read_text())
    image_ids = [it.image_id for it in source.items[:processed]]
    metrics = evaluate_metrics(source.annotations.raw, results, image_ids=image_ids, metric=metric)
    write_json(out_dir / METRICS_NAME, metrics)
    return metrics
