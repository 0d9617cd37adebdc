"""`pgd-serve predict --engine ray`: the local engine's inputs, artifacts and outputs, on Ray Data.

The work is one streaming Ray Data pipeline over the source's inputs, kept in input order:

1. decode and letterbox (`ray_stages.decode_batch`): `load_item` (the local engine's) in Ray
   tasks, a batch of paths or URIs each; unreadable images become rows with their error, never
   failures of the job;
2. inference and post-processing (`ray_stages.InferActor`): a fixed pool of `--actors` actors
   (`ActorPoolStrategy`; Ray Data restarts a lost actor and retries its batch), each opening the
   artifact once through the runtime (ONNX Runtime and TensorRT import no torch), with
   `--gpus-per-actor` GPUs each on GPU machines; with `--save-images` the actor also draws each
   image into `--out/images` (on a cluster `--out` must then be a shared folder);
3. writing: the driver consumes the results as they stream back, writes each batch as a shard
   (`serve.shards`: a rerun into the same --out after a kill skips what the shards hold), and
   at the end the same predictions.json, failures.json and summary.json as the local engine.

Without `--address` (or `RAY_ADDRESS`) a local Ray starts with this machine's cores and stops at
the end; with one, the run joins that cluster and leaves it running. The artifact is verified
before any actor opens it, by the same check as the local engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pgd_deploy.io_utils import file_sha256, remove_stale_temp_files, write_json
from pgd_deploy.metrics import evaluate as evaluate_metrics
from pgd_deploy.runtime.backends import Backend
from pgd_deploy.serve.outputs import (
    FAILURES_NAME,
    IMAGES_DIR,
    METRICS_NAME,
    RESULTS_NAME,
    SUMMARY_NAME,
    SummaryFile,
    image_output_path,
    prepare_images_dir,
)
from pgd_deploy.serve.predictor import PredictSummary, _progress, check_evaluable
from pgd_deploy.serve.ray_stages import InferActor, decode_batch, result_rows
from pgd_deploy.serve.shards import ShardStore
from pgd_deploy.serve.sources import Source

logger = logging.getLogger(__name__)

DECODE_CPUS = 0.5  # Ray CPUs of each decode task (unlike the actors': no stage fusion)


def require_ray() -> Any:
    """`ray` with Ray Data, or an ImportError that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ImportError("--engine ray needs Ray Data: pip install 'pgd-deploy[ray]'") from None
    return ray


@contextlib.contextmanager
def ray_session(
    address: str | None = None, *, actors: int = 1, cpus_per_actor: float = 1.0
) -> Iterator[str]:
    """Join the cluster at `address` (or `RAY_ADDRESS`), or start a local Ray with this
    machine's cores (at least room for the actors and one decode task) and stop it at the end;
    one already running in this process is used and left running. Yields how the run reached
    Ray, for the log."""
    ray = require_ray()
    if ray.is_initialized():
        yield "the Ray already running in this process"
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=False)
        reached = f"the cluster at {address}"
    else:
        cpus = max(os.cpu_count() or 1, math.ceil(actors * cpus_per_actor + DECODE_CPUS))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        reached = f"a local Ray on {cpus} CPUs"
    try:
        yield reached
    finally:  # stops the local Ray this started; from a joined cluster it only disconnects
        ray.shutdown()


def run_predict_ray(
    backend: Backend,
    artifact: str | Path,
    source: Source,
    out_dir: str | Path,
    *,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    device: str = "cpu",
    allow_unverified: bool = False,
    batch_size: int = 8,
    score_thresh: float | None = None,
    nms_thresh: float | None = None,
    max_det: int | None = None,
    max_pixels: int | None = 40_000_000,
    evaluate: bool = False,
    metric: str | None = None,
    progress: bool = True,
    save_images: bool = False,
    draw_score: float = 0.3,
) -> PredictSummary:
    """`serve.predictor.run_predict` on Ray Data (inside a `ray_session`).

    Args:
        backend: the artifact opened in the driver (its input size, classes, description).
        artifact: its file, which every actor opens (verified already: `runtime.verify`).
        actors, cpus_per_actor, gpus_per_actor: the inference actor pool (Ray resources of
            each actor); the cluster must have a CPU left for decoding beside them.
        device: where the actors run the artifact (`runtime.backends.load_backend`).
        save_images: the actors write annotated images to `out_dir/images` (the local engine's
            names); a resumed run keeps those of the images done before.
        Others: as `run_predict`.

    Returns:
        The summary, as the local engine's (Ctrl-C ends the run early with valid outputs).
    """
    ray = require_ray()
    if actors < 1:
        raise ValueError(f"--actors must be >= 1, got {actors}")
    if not (gpus_per_actor >= 0 and 0 < cpus_per_actor < math.inf):
        raise ValueError(
            f"--cpus-per-actor must be > 0 and --gpus-per-actor >= 0, got {cpus_per_actor} and "
            f"{gpus_per_actor}"
        )
    _check_room(ray, actors, cpus_per_actor, gpus_per_actor)
    category_ids = backend.category_ids
    if evaluate:
        check_evaluable(source, category_ids, backend.class_names)
    category_ids = category_ids or range(1, 1 << 31)  # no class list: label + 1, as local
    out_dir = Path(out_dir)
    thresholds = {"score_thresh": score_thresh, "nms_thresh": nms_thresh, "max_det": max_det}
    batch = max(1, min(batch_size, backend.max_batch))
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # results written in input order
    context.enable_progress_bars = False  # the run's own bar counts images
    overrides = {k: v for k, v in thresholds.items() if v is not None}
    fingerprint = {
        "artifact": str(Path(artifact).resolve()),
        "sha256": file_sha256(artifact),
        "source": source.spec,
        "inputs": _inputs_digest(source),  # a digest: run.json stays small for millions
        "overrides": overrides,
        "max_pixels": max_pixels,
        "save_images": draw_score if save_images else None,
    }
    for name in (SUMMARY_NAME, METRICS_NAME):  # a previous run's, until this one writes its own
        (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in remove_stale_temp_files(out_dir):
        logger.info("removed %s, left by a run that was killed", leftover)
    store = ShardStore(out_dir, fingerprint)
    done = store.done()
    if not done:  # a new run: a previous run's annotated images go (those of a resumed one stay)
        prepare_images_dir(out_dir, save_images=save_images)
    used: set[str] = set()  # the local engine's names, given in input order, done or not
    save_to = {
        it.index: str(image_output_path(out_dir / IMAGES_DIR, it, used)) if save_images else ""
        for it in source.items
    }
    rows = [
        {
            "index": it.index,
            "path": str(it.path),
            "image_id": it.image_id,
            "save_to": save_to[it.index],
        }
        for it in source.items
        if it.index not in done
    ]
    pipeline = lambda: (  # noqa: E731 (built only when images are left: from_items runs now)
        ray.data.from_items(rows, override_num_blocks=-(-len(rows) // batch))
        .map_batches(
            decode_batch,
            batch_size=batch,
            batch_format="numpy",
            fn_kwargs={"input_size": backend.input_size, "max_pixels": max_pixels},
            num_cpus=DECODE_CPUS,  # unlike the actors': Ray keeps the stages apart (no fusion)
        )
        .map_batches(
            InferActor,
            batch_size=batch,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor,
            fn_constructor_kwargs={
                "artifact": str(artifact),
                "device": device,
                "allow_unverified": allow_unverified,
                "overrides": overrides,
                "category_ids": category_ids,
                "draw_score": draw_score if save_images else None,
                "max_pixels": max_pixels,
            },
        )
    )
    summary = PredictSummary(
        total=len(source),
        out_dir=str(out_dir),
        backend=f"{backend.describe()} on Ray ({actors} actor{'s' * (actors > 1)})",
        warnings=list(backend.warnings),
    )
    summary.resumed = len(store)  # done by an earlier run into this --out, not redone
    summary_file = SummaryFile(out_dir / SUMMARY_NAME, {**summary.to_dict(), "status": "running"})
    try:
        if rows:
            _consume(pipeline(), store, summary, progress)
    except Exception as err:  # a full disk, a lost cluster: the shards written stay valid
        summary.error = str(err) or type(err).__name__
        logger.error("stopped after %d inputs: %s", len(store), err)
        with contextlib.suppress(Exception):
            summary_file.record(summary.to_dict())
        raise
    finally:  # the final files from every shard, also after Ctrl-C or an error
        totals = store.write_outputs(out_dir / RESULTS_NAME, out_dir / FAILURES_NAME)
        summary.processed, summary.succeeded = totals.ok + totals.failed, totals.ok
        summary.failed, summary.detections = totals.failed, totals.detections
        summary.save_errors = totals.save_errors
    for error in totals.errors:
        logger.warning("skipped: %s", error)
    if evaluate and totals.image_ids:
        summary.metrics = evaluate_metrics(
            source.annotations.raw,
            json.loads((out_dir / RESULTS_NAME).read_text()),
            image_ids=totals.image_ids,
            metric=metric or backend.metric,
        )
        write_json(out_dir / METRICS_NAME, summary.metrics)
    summary_file.write(summary.to_dict())
    return summary


def _check_room(ray: Any, actors: int, cpus_per_actor: float, gpus_per_actor: float) -> None:
    """Refuse a pool that would leave no CPU for the decode tasks (the run would wait forever)
    or ask for more GPUs than the cluster has."""
    have = ray.cluster_resources()
    cpus, gpus = float(have.get("CPU", 0.0)), float(have.get("GPU", 0.0))
    if actors * cpus_per_actor + DECODE_CPUS > cpus:
        raise ValueError(
            f"--actors {actors} x --cpus-per-actor {cpus_per_actor} leave no room for the decode "
            f"tasks ({DECODE_CPUS} CPU each) on a Ray cluster of {cpus:g} CPUs: use fewer "
            "actors or a smaller --cpus-per-actor"
        )
    if actors * gpus_per_actor > gpus:
        raise ValueError(
            f"--actors {actors} x --gpus-per-actor {gpus_per_actor} need "
            f"{actors * gpus_per_actor:g} GPUs; the Ray cluster has {gpus:g}"
        )


def _consume(pipeline: Any, store: ShardStore, summary: PredictSummary, progress: bool) -> None:
    """A shard for every result batch as it streams back; this run's time per stage."""
    totals = {"pre": 0.0, "infer": 0.0, "post": 0.0}
    bar, redirect = _progress(summary.total, progress)
    if bar is not None:
        bar.update(len(store))
    start, images = time.perf_counter(), 0
    try:
        with redirect:
            for batch in pipeline.iter_batches(batch_size=None, batch_format="numpy"):
                store.write(result_rows(batch))
                images += int(sum(1 for e in batch["error"] if not e))
                for stage in totals:
                    totals[stage] += float(np.sum(batch[f"{stage}_s"]))
                if bar is not None:
                    bar.update(len(batch["index"]))
    except KeyboardInterrupt:
        logger.warning("interrupted: keeping the %d inputs done", len(store))
        summary.interrupted = True
    finally:
        if bar is not None:
            bar.close()
        summary.seconds = time.perf_counter() - start
    summary.decoded = images
    summary.stage_ms = {k: 1000.0 * v / max(images, 1) for k, v in totals.items()}
    summary.stage_ms["wait"] = 0.0


def _inputs_digest(source: Source) -> str:
    """sha256 of the source's inputs (path and image id of each, in order)."""
    digest = hashlib.sha256()
    for item in source.items:
        digest.update(f"{item.path}\t{item.image_id}\n".encode())
    return f"{len(source.items)} inputs, sha256 {digest.hexdigest()}"
