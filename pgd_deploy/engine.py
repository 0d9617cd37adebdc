"""The training step loop and evaluation (DETR's `train_one_epoch` / `evaluate` shape).

Knows nothing about distillation: extra losses come from an optional `loss_provider` callable
`(images, outputs, targets) -> dict[str, Tensor]`, added to the detector's own losses. Every loss
term arrives unweighted; `StepContext.loss_weights` (one plain dict, see `combine_weights`) is the
only place a weight is applied, so the logged values are the terms themselves.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from pgd_deploy import distributed as dist
from pgd_deploy.config import TrainJob, load_config, to_dict
from pgd_deploy.data.dataset import Batch, DetectionDataset, build_dataset, collate
from pgd_deploy.devices import autocast_setup, memory_format_for
from pgd_deploy.metrics import AP_KEYS, detections_to_coco
from pgd_deploy.metrics import evaluate as evaluate_metrics
from pgd_deploy.models import build_detector, load_detector
from pgd_deploy.progress import Progress
from pgd_deploy.schedule import Schedule, build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

LossProvider = Callable[[Tensor, object, Sequence[dict[str, Tensor]]], dict[str, Tensor]]
# Called once with the freshly built student, before any DDP wrapping (it may change it).
LossProviderFactory = Callable[[nn.Module, torch.device], LossProvider | None]


class NonFiniteLossError(RuntimeError):
    """Raised when the weighted loss is NaN or infinite (the step is not applied)."""


@dataclass
class StepContext:
    """What one optimisation step needs besides the batch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    loss_weights: dict[str, float] = field(default_factory=dict)  # by loss name; 1.0 if absent
    weighted_by_user: frozenset[str] = frozenset()  # train.loss_weights names: each must exist
    loss_provider: LossProvider | None = None
    grad_clip: float = 0.0
    autocast_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    memory_format: torch.memory_format = torch.contiguous_format  # of the model and the images


def weighted_sum(losses: dict[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """Sum of `losses`, each multiplied by `weights.get(name, 1.0)`."""
    return sum(v * weights.get(k, 1.0) for k, v in losses.items())


def combine_weights(*weights: Mapping[str, float]) -> dict[str, float]:
    """One weight per loss name: the product of its weights in `weights` (absent = 1.0).

    E.g. a loss provider's own weights (the PGD alpha, beta, ...) and `train.loss_weights`.
    """
    combined: dict[str, float] = {}
    for mapping in weights:
        for name, weight in mapping.items():
            combined[name] = combined.get(name, 1.0) * float(weight)
    return combined


def train_step(ctx: StepContext, batch: Batch) -> dict[str, float]:
    """One forward/backward/update on `batch`; returns the float value of each loss term.

    Raises:
        NonFiniteLossError: the loss is not finite (on any process); nothing was updated.
    """
    batch = batch.to(ctx.device)
    if ctx.memory_format != torch.contiguous_format:
        batch.images = batch.images.contiguous(memory_format=ctx.memory_format)
    amp = (
        torch.autocast(ctx.device.type, dtype=ctx.autocast_dtype)
        if ctx.autocast_dtype is not None
        else nullcontext()
    )
    with amp:
        outputs = ctx.model(batch.images)
        losses = dist.unwrap(ctx.model).loss(outputs, batch.targets)
        if ctx.loss_provider is not None:
            losses.update(ctx.loss_provider(batch.images, outputs, batch.targets))
    unknown = ctx.weighted_by_user - losses.keys()
    if unknown:  # a misspelt name would otherwise weigh nothing, silently
        raise ValueError(
            f"train.loss_weights: no loss named {', '.join(sorted(unknown))}; this run's losses "
            f"are {', '.join(sorted(losses))}"
        )
    total = weighted_sum({k: v.float() for k, v in losses.items()}, ctx.loss_weights)
    finite = torch.isfinite(total.detach()).float()
    if dist.is_dist():  # every process must take the same decision
        finite = dist.reduce_mean(finite)
    if finite.item() < 1.0:
        bad = [k for k, v in losses.items() if not torch.isfinite(v.detach()).all()]
        raise NonFiniteLossError(f"non-finite loss (terms: {', '.join(bad) or 'on another rank'})")
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.scaler is not None:
        ctx.scaler.scale(total).backward()
        ctx.scaler.unscale_(ctx.optimizer)
    else:
        total.backward()
    params = [p for g in ctx.optimizer.param_groups for p in g["params"]]
    grad_norm = nn.utils.clip_grad_norm_(
        params, ctx.grad_clip if ctx.grad_clip > 0 else float("inf")
    )
    # With a grad scaler, an overflow just skips the step and lowers the scale. Otherwise a
    # non-finite gradient would poison the weights: stop before the update (gradients are
    # identical on every process after DDP's all-reduce, so all processes agree).
    if ctx.scaler is None and not torch.isfinite(grad_norm):
        ctx.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError("non-finite gradients (the loss itself was finite)")
    if ctx.scaler is not None:
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        ctx.optimizer.step()
    ctx.scheduler.step()
    values = {k: float(v.detach()) for k, v in losses.items()}
    values["loss"] = float(total.detach())
    return values


@dataclass
class EpochStats:
    """Running means of the loss terms over an epoch, plus counts.

    `failures` holds (file name, reason) of every image that could not be loaded, in order;
    `skipped_batches` counts batches with no loadable image (no step was taken on them).
    """

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    images: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    skipped_batches: int = 0
    seconds: float = 0.0

    @property
    def batches(self) -> int:
        """Batches consumed so far: trained on or skipped."""
        return self.steps + self.skipped_batches

    def add(self, values: dict[str, float], images: int) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.images += images

    def means(self) -> dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.sums.items()}


def train_one_epoch(
    ctx: StepContext,
    loader: Iterable[Batch],
    stats: EpochStats,
    on_step: Callable[[dict[str, float], int], bool],
) -> None:
    """Run `ctx` over `loader`. After each step `on_step(values, images)` is called; when it
    returns False the epoch stops early (end of schedule). Failed images are recorded in
    `stats`; a batch without a loadable image is skipped (on every process, which stay in step)
    and counted, and the epoch goes on.
    """
    ctx.model.train()
    start = time.perf_counter()
    for batch in loader:
        stats.failures.extend((f.file_name, f.reason) for f in batch.failures)
        empty = torch.tensor(float(len(batch) == 0))
        if dist.is_dist():
            empty = dist.reduce_mean(empty.to(ctx.device))
        if empty.item() > 0:  # some process has nothing to train on in this step
            stats.skipped_batches += 1
            continue
        values = train_step(ctx, batch)
        stats.add(values, len(batch))
        if not on_step(values, len(batch)):
            break
    stats.seconds += time.perf_counter() - start


@dataclass
class Evaluation:
    """What `evaluate` measured.

    Attributes:
        metrics: COCO metrics (`metrics.AP_KEYS`) or crowd metrics (`metrics.CROWD_KEYS`); empty
            on processes other than rank 0 and when no image could be read.
        results: COCO results (rank 0: all of them; other processes: their share).
        images: images in the dataset.
        unreadable: (file name, reason) of the images that could not be read (all processes);
            they count as images without detections in the metrics.
    """

    metrics: dict[str, float]
    results: list[dict]
    images: int
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def read(self) -> int:
        return self.images - len(self.unreadable)

    def describe_unreadable(self) -> str:
        """One line for a summary ("" when every image was read)."""
        if not self.unreadable:
            return ""
        examples = "; ".join(reason for _, reason in self.unreadable[:3])
        more = " ..." if len(self.unreadable) > 3 else ""
        if not self.read:
            return f"none of the {self.images} images could be read: {examples}{more}"
        return (
            f"{len(self.unreadable)} of {self.images} images could not be read and count as "
            f"images without detections: {examples}{more}"
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: DetectionDataset,
    *,
    device: torch.device,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    metric: str = "coco",
) -> Evaluation:
    """The metrics of `model` on `dataset` (no augmentation), sharded over processes: COCO's,
    or with `metric="crowd"` CrowdHuman's MR^-2, AP and JI (`pgd_deploy.metrics.evaluate`).

    Images are resized as in training (shorter side `min_size`, longer at most `max_size`), padded
    to a multiple of 32 and post-processed with the shared numpy code of `pgd_deploy.runtime`.
    Unreadable images are reported in the result (and logged), never fatal; when none can be
    read there are no metrics.
    """
    detector = dist.unwrap(model)
    was_training = detector.training
    detector.eval()
    indices = list(range(len(dataset)))[dist.rank() :: dist.world_size()]
    results: list[dict] = []
    unreadable: list[tuple[str, str]] = []
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    where = f"evaluating on {len(dataset)} images of {dataset.coco.path.name}"
    with Progress(len(indices), where, unit="img", enabled=dist.is_main()) as bar:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = collate([dataset[i] for i in chunk])
            unreadable.extend((f.file_name, f.reason) for f in batch.failures)
            bar.update(len(chunk))
            if len(batch) == 0:
                continue
            with amp:
                dets = detector.predict(batch.images.to(device), batch.transforms)
            for image_id, det in zip(batch.image_ids, dets):
                results.extend(detections_to_coco(image_id, det, dataset.coco.category_ids))
    detector.train(was_training)
    gathered = dist.all_gather_objects((results, unreadable))
    unreadable = [f for _, part in gathered for f in part]
    out = Evaluation({}, results, len(dataset), unreadable)
    if unreadable and dist.is_main():
        logger.warning("%s: %s", dataset.coco.path, out.describe_unreadable())
    if not dist.is_main() or not out.read:
        return out
    out.results = [r for part, _ in gathered for r in part]
    image_ids = [r.image_id for r in dataset.coco.images]
    out.metrics = evaluate_metrics(
        dataset.coco.raw, out.results, image_ids=image_ids, metric=metric
    )
    return out


def evaluate_checkpoint(
    path: str | Path, overrides: Sequence[str] = (), device: str = "auto"
) -> Evaluation:
    """COCO metrics of a checkpoint on its validation data (`--set data.*` may point elsewhere).

    Unreadable validation images are counted in the result (`Evaluation.unreadable`); when none
    can be read its metrics are empty.
    """
    from pgd_deploy.devices import select_device  # torch device set-up, CUDA checks

    dev = select_device(device)
    loaded = load_detector(path, device=dev)
    model, state = loaded.detector, loaded.checkpoint
    cfg = load_config(TrainJob, None, overrides, base=to_dict(loaded.config))
    val = build_dataset(cfg.data, "val", train=False)
    if val.coco.category_ids != list(state.get("category_ids", val.coco.category_ids)):
        raise ValueError(
            f"{path}: trained on categories {state.get('category_ids')} but {val.coco.path} has "
            f"{val.coco.category_ids}"
        )
    start = time.perf_counter()
    evaluation = evaluate(
        model, val, device=dev, batch_size=cfg.train.batch_size, metric=cfg.data.metric
    )
    logger.info("evaluated %d images in %.1f s", evaluation.read, time.perf_counter() - start)
    return evaluation


def build_step_context(
    cfg: TrainJob,
    device: torch.device,
    schedule: Schedule,
    make_loss_provider: LossProviderFactory | None = None,
    qat_entry: dict | None = None,
) -> StepContext:
    """A training run's student (fake-quantized for QAT; `qat_entry`: the checkpoint entry of
    a resumed QAT run, `qat.prepare_student`), loss provider, DDP wrapper, optimiser, scheduler
    and mixed precision, on `device`."""
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every process
    model = build_detector(cfg.model).to(device)
    if cfg.qat.init:  # quantization-aware fine-tune: the trained student, fake-quantized
        from pgd_deploy.qat import prepare_student

        prepare_student(model, cfg, device, resume=qat_entry)
    provider = make_loss_provider(model, device) if make_loss_provider else None
    memory_format = memory_format_for(cfg.train.channels_last, device)
    model.to(memory_format=memory_format)
    head_weights = dict(model.head.loss_weights)  # before a DDP wrapper hides the head
    teacher = getattr(provider, "teacher", None)  # the distiller's teacher sees the same batch
    if isinstance(teacher, nn.Module):
        teacher.to(memory_format=memory_format)
    if dist.is_dist():
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = build_optimizer(model, cfg.train, schedule.lr)
    amp_dtype, scaler = autocast_setup(cfg.train.amp, device)
    return StepContext(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, schedule),
        device=device,
        # The head's own weights (e.g. ATSS's GIoU 2), the provider's (e.g. the distiller's),
        # times train.loss_weights.
        loss_weights=combine_weights(
            head_weights, getattr(provider, "loss_weights", {}), cfg.train.loss_weights
        ),
        weighted_by_user=frozenset(cfg.train.loss_weights),
        loss_provider=provider,
        grad_clip=cfg.train.grad_clip,
        autocast_dtype=amp_dtype,
        scaler=scaler,
        memory_format=memory_format,
    )


def format_epoch_summary(
    epoch: int, stats: EpochStats, metrics: dict[str, float] | None, lr: float
) -> str:
    """A two-line table summarising one epoch."""
    means = stats.means()
    cols = ["epoch", "iters", "images", "img/s", "failed", "lr", "loss"]
    vals = [
        str(epoch),
        str(stats.steps),
        str(stats.images),
        f"{stats.images / max(stats.seconds, 1e-9):.1f}",
        str(len(stats.failures)),
        f"{lr:.2e}",
        f"{means.get('loss', math.nan):.4f}",
    ]
    for key in ("AP", "AP50", "MR2", "JI"):
        if metrics and key in metrics:
            cols.append(key)
            vals.append(f"{100 * metrics[key]:.1f}")
    widths = [max(len(c), len(v)) for c, v in zip(cols, vals)]
    head = "  ".join(c.rjust(w) for c, w in zip(cols, widths))
    row = "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return f"{head}\n{row}"


__all__ = [
    "AP_KEYS",
    "EpochStats",
    "Evaluation",
    "LossProvider",
    "NonFiniteLossError",
    "StepContext",
    "combine_weights",
    "evaluate",
    "evaluate_checkpoint",
    "format_epoch_summary",
    "train_one_epoch",
    "train_step",
    "weighted_sum",
]
