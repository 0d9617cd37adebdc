"""`fit`: set up devices, data, model, optimiser and schedule, run epochs, checkpoint, evaluate.

One CPU, one GPU, or many GPUs/nodes under `torchrun` (DistributedDataParallel, rank-0-only
logging and checkpointing). Distillation plugs in through `make_loss_provider`, called once with
the freshly built student before it is wrapped for DDP (so it may initialise it from a teacher).
A provider may carry `loss_weights` (a plain dict by loss name, e.g. `Distiller.loss_weights`):
the engine applies them, multiplied by `train.loss_weights`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pgd_deploy import distributed as dist
from pgd_deploy.checkpoint import (
    CheckpointError,
    UnsafeFileError,
    load_checkpoint,
    save_checkpoint,
)
from pgd_deploy.config import TrainJob, save_config, to_dict
from pgd_deploy.data.loader import build_train_data
from pgd_deploy.devices import (
    init_distributed,
    rng_state,
    seed_everything,
    select_device,
    set_rng_state,
)
from pgd_deploy.engine import (
    EpochStats,
    LossProviderFactory,
    NonFiniteLossError,
    build_step_context,
    evaluate,
    format_epoch_summary,
    train_one_epoch,
)
from pgd_deploy.io_utils import remove_stale_temp_files, write_json
from pgd_deploy.metrics import format_metrics
from pgd_deploy.schedule import Schedule
from pgd_deploy.training_log import TrainingLog, UnreadableImages
from pgd_deploy.workdir import check_resumable, check_same_classes, check_start, clear_run

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    """Outcome of `fit`.

    Attributes:
        completed: the run reached its last iteration (now or before, for a finished run).
        unreadable: training images that could not be read (skipped), "file: reason".
    """

    completed: bool
    work_dir: Path
    iterations: int
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""
    unreadable: list[str] = field(default_factory=list)


class TrainingStopped(RuntimeError):
    """The run cannot go on (no readable training batch in an epoch, no readable validation
    image); the message says why."""


def _call_if_present(obj: Any, method: str, *args: Any) -> Any:
    """`obj.method(*args)` when `obj` has that method (a loss provider with state), else None."""
    fn = getattr(obj, method, None)
    return fn(*args) if callable(fn) else None


class Trainer:
    """Holds everything `fit` sets up; one method per phase."""

    def __init__(
        self,
        cfg: TrainJob,
        work_dir: Path,
        make_loss_provider: LossProviderFactory | None,
        resume_state: dict[str, Any] | None = None,
    ) -> None:
        self.work_dir = work_dir
        self.device = select_device(cfg.train.device)
        init_distributed(self.device)
        seed_everything(cfg.train.seed + dist.rank(), cfg.train.deterministic)
        data = build_train_data(cfg, self.device)
        self.cfg, self.train_set, self.val_set = data.cfg, data.train_set, data.val_set
        self.sampler, self.loader = data.sampler, data.loader
        self.schedule = Schedule.from_config(
            self.cfg.train, iters_per_epoch=len(self.sampler), world_size=dist.world_size()
        )
        qat_entry = (resume_state or {}).get("qat") or None  # QAT resume: not from qat.init
        self.ctx = build_step_context(
            self.cfg, self.device, self.schedule, make_loss_provider, qat_entry=qat_entry
        )
        self.iteration = 0  # optimisation steps taken (the schedule's clock)
        self.epoch = 0
        self.position = 0  # batches of the current epoch consumed: trained on or skipped
        self.best_ap = -1.0
        self.saved_at: int | None = None  # the iteration of the last.pt this run wrote or resumed
        self.unreadable = UnreadableImages(enabled=dist.is_main())
        self.log = TrainingLog(work_dir, enabled=dist.is_main(), log_every=cfg.train.log_every)

    # ---- checkpoints ----------------------------------------------------------------------

    def state(self, metrics: dict[str, float] | None = None) -> dict[str, Any]:
        ctx = self.ctx
        qat = {}
        if self.cfg.qat.init:  # what rebuilds the fake quantizers (plain data, weights_only)
            from pgd_deploy.qat import checkpoint_entry

            qat = {"qat": checkpoint_entry(dist.unwrap(ctx.model), self.cfg.qat.init)}
        return {
            **qat,
            "model": dist.unwrap(ctx.model).state_dict(),
            "config": to_dict(self.cfg),
            "classes": self.train_set.coco.class_names,
            "category_ids": self.train_set.coco.category_ids,
            "iteration": self.iteration,
            "epoch": self.epoch,
            "epoch_batch": self.position,
            "metrics": metrics or {},
            "best_ap": self.best_ap,
            "optimizer": ctx.optimizer.state_dict(),
            "scheduler": ctx.scheduler.state_dict(),
            "scaler": ctx.scaler.state_dict() if ctx.scaler else {},
            "rng": rng_state(),
            # e.g. the distiller's mask-jitter generator (`Distiller.state_dict`)
            "loss_provider": _call_if_present(ctx.loss_provider, "state_dict") or {},
            "history": self.log.history,
        }

    def save(self, metrics: dict[str, float] | None = None, best: bool = False) -> None:
        if not dist.is_main():
            return
        state = self.state(metrics)
        save_checkpoint(state, self.work_dir / "last.pt")
        self.saved_at = self.iteration
        if best:
            save_checkpoint(state, self.work_dir / "best.pt")

    def resume(self) -> None:
        path = self.work_dir / "last.pt"
        state = load_checkpoint(path, map_location=self.device)
        dist.unwrap(self.ctx.model).load_state_dict(state["model"])
        self.ctx.optimizer.load_state_dict(state["optimizer"])
        self.ctx.scheduler.load_state_dict(state["scheduler"])
        if self.ctx.scaler and state.get("scaler"):
            self.ctx.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.saved_at = self.iteration
        self.epoch = int(state["epoch"])
        # Checkpoints before "epoch_batch" existed had no skipped batches to account for.
        self.position = int(
            state.get("epoch_batch", self.iteration - self.epoch * len(self.sampler))
        )
        self.best_ap = float(state.get("best_ap", -1.0))
        self.log.history = list(state.get("history", []))
        set_rng_state(state["rng"])
        if state.get("loss_provider"):
            _call_if_present(self.ctx.loss_provider, "load_state_dict", state["loss_provider"])
        logger.info("resumed from %s at iteration %d (epoch %d)", path, self.iteration, self.epoch)

    # ---- phases -----------------------------------------------------------------------------

    def run_epoch(self) -> EpochStats:
        """Train on the rest of the current epoch (from `position`), or until the schedule ends.

        A batch without a readable image is skipped: it moves `position` but not `iteration`.
        """
        per_epoch = len(self.sampler)
        self.sampler.set_epoch(self.epoch)
        start = self.position
        self.sampler.skip(start)
        stats = EpochStats()
        every = self.cfg.train.checkpoint_every

        noted = 0  # failures of `stats` already given to `self.unreadable`

        def on_step(values: dict[str, float], images: int) -> bool:
            nonlocal noted
            self.iteration += 1
            self.position = start + stats.batches
            self.unreadable.note(stats.failures[noted:])
            noted = len(stats.failures)
            self.log.step(self.iteration, values, images, self.ctx.optimizer.param_groups[0]["lr"])
            if every and self.iteration % every == 0 and self.position < per_epoch:
                self.save()  # mid-epoch; the end of an epoch saves anyway
            return self.iteration < self.schedule.total_iters

        train_one_epoch(self.ctx, self.loader, stats, on_step)
        self.position = start + stats.batches
        self.unreadable.note(stats.failures[noted:])
        if start == 0 and stats.steps == 0:
            raise TrainingStopped(self._no_step_message(stats))
        return stats

    def _no_step_message(self, stats: EpochStats) -> str:
        files = self.train_set.coco.path
        return (
            f"epoch {self.epoch + 1}: all {stats.skipped_batches} batches were skipped because "
            f"none of their images could be read, so the run cannot reach "
            f"{self.schedule.total_iters} iterations (it stopped at {self.iteration}); "
            f"{len(self.unreadable)} training image(s) of {files} are unreadable, e.g. "
            f"{'; '.join(self.unreadable.listing()[:3])}"
        )

    def evaluate(self) -> dict[str, float]:
        evaluation = evaluate(
            self.ctx.model,
            self.val_set,
            device=self.device,
            batch_size=max(1, self.cfg.train.batch_size),
            metric=self.cfg.data.metric,
            # no autocast: the metrics match `pgd-train eval` and the exported model (for a QAT
            # run, the fake-quant model its int8 export reproduces)
        )
        if not evaluation.read:
            self.save()  # keep the weights trained so far
            raise TrainingStopped(
                f"validation {self.val_set.coco.path}: {evaluation.describe_unreadable()}; the "
                f"weights at iteration {self.iteration} are in {self.work_dir / 'last.pt'}"
            )
        return evaluation.metrics

    def evaluate_and_save(self, last: bool) -> dict[str, float]:
        """Evaluate when due (always after the last step) and checkpoint (best.pt on a new best
        AP, or at the end when there was none); returns the metrics ({} when not due)."""
        metrics: dict[str, float] = {}
        eval_every = self.cfg.train.eval_every
        if last or (eval_every and self.epoch % eval_every == 0):
            metrics = self.evaluate()
            self.log.eval(self.iteration, metrics)
        best = bool(metrics) and metrics["AP"] > self.best_ap
        if best:
            self.best_ap = metrics["AP"]
        self.save(metrics, best=best or (last and self.best_ap < 0))
        return metrics

    def end_epoch(self, stats: EpochStats) -> dict[str, float]:
        self.epoch += 1
        self.position = 0
        metrics = self.evaluate_and_save(last=self.iteration >= self.schedule.total_iters)
        lr = self.ctx.optimizer.param_groups[0]["lr"]
        self.log.epoch_summary(format_epoch_summary(self.epoch, stats, metrics, lr), stats)
        return metrics

    def fit(self) -> FitResult:
        total = self.schedule.total_iters
        self.log.start(total, self.iteration)
        if dist.is_main():
            logger.info("%s", self.schedule.describe(self.cfg.train.batch_size * dist.world_size()))
        metrics: dict[str, float] = {}  # (on rank 0 only: the others' stay empty)
        try:
            if self.iteration >= total:  # resumed after the last step, before its evaluation
                metrics = self.evaluate_and_save(last=True)
            while self.iteration < total:
                metrics = self.end_epoch(self.run_epoch())
        except (NonFiniteLossError, TrainingStopped) as err:
            message = f"stopped at iteration {self.iteration}: {err}"
            if isinstance(err, NonFiniteLossError):
                message = f"stopped at iteration {self.iteration + 1}: {err}. " + self._last_good()
            logger.error("%s", message)
            self.log.close()
            unreadable = self.unreadable.listing()
            return FitResult(False, self.work_dir, self.iteration, {}, message, unreadable)
        self.log.close()
        if dist.is_main():
            write_json(self.work_dir / "metrics.json", metrics)
            self.log.plot_curves(self.work_dir / "curves.png")
            logger.info("%s", format_metrics(metrics, title=f"final metrics ({self.work_dir})"))
            if self.unreadable:
                logger.warning("%s", self.unreadable.summary())
        unreadable = self.unreadable.listing()
        return FitResult(True, self.work_dir, self.iteration, metrics, "", unreadable)

    def _last_good(self) -> str:
        """Where a run stopped by a non-finite loss can go on from, or that it cannot."""
        last = self.work_dir / "last.pt"
        if self.saved_at is not None and last.is_file():
            return (
                f"The last good checkpoint is {last} (iteration {self.saved_at}): set "
                "train.grad_clip and go on from it with --resume, or lower train.base_lr and "
                "start again (--overwrite)."
            )
        return (
            f"No checkpoint was written before it ({last} comes at the end of the first epoch, "
            "or every train.checkpoint_every iterations): lower train.base_lr or set "
            "train.grad_clip and start again (--overwrite)."
        )

    def already_finished(self, state: dict[str, Any]) -> FitResult:
        """`fit --resume` of a run that reached its last iteration: change nothing, say so.

        Results are never replaced; only a metrics.json or curves.png missing after a crash
        in the last moments of the run is written again from the checkpoint's final metrics.
        """
        metrics = dict(state.get("metrics") or {})
        if dist.is_main():
            path = self.work_dir / "metrics.json"
            if not path.is_file() and metrics:
                write_json(path, metrics)
            if not (self.work_dir / "curves.png").is_file():
                self.log.plot_curves(self.work_dir / "curves.png")
        message = (
            f"{self.work_dir} holds a finished run (iteration {self.iteration} of "
            f"{self.schedule.total_iters}): nothing to do, its results are unchanged. Train "
            "longer with --set train.max_iters=N, or train into a new --work-dir"
        )
        logger.info("%s", message)
        return FitResult(True, self.work_dir, self.iteration, metrics, message)


def fit(
    cfg: TrainJob,
    *,
    work_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    make_loss_provider: LossProviderFactory | None = None,
) -> FitResult:
    """Train `cfg` into `work_dir` (default `train.work_dir`): last.pt, best.pt, config.toml,
    metrics.json, curves.png.

    A folder that already holds a run is continued with `resume` (a finished run is left as it
    is) or replaced with `overwrite`; otherwise it is refused. Nothing is written before these
    checks and those of a resume (same architecture, optimiser and label set) have passed.

    When `cfg.distill.teacher` is set and no `make_loss_provider` is given, the PGD distiller
    is plugged in (see `pgd_deploy.distill.build_distiller`).

    Raises:
        ValueError: a refused start (see `workdir.check_start`) or an incompatible resume.
        FileNotFoundError: `resume` without a last.pt.
    """
    work_dir = Path(work_dir or cfg.train.work_dir)
    if make_loss_provider is None and cfg.distill.teacher:
        from pgd_deploy.distill import build_distiller

        def make_loss_provider(student: nn.Module, device: torch.device):
            return build_distiller(
                cfg.distill, student, device=device, seed=cfg.train.seed, rank=dist.rank()
            )

    check_start(work_dir, resume=resume, overwrite=overwrite)
    state = load_checkpoint(work_dir / "last.pt") if resume else None
    if state is not None:
        check_resumable(cfg, state, work_dir / "last.pt")
    trainer = Trainer(cfg, work_dir, make_loss_provider, resume_state=state)
    if state is not None:
        _resume(trainer, state)
    if dist.is_main():
        if overwrite:
            clear_run(work_dir)
        for leftover in remove_stale_temp_files(work_dir):
            logger.info("removed %s, left by an interrupted checkpoint write", leftover)
    if (
        state is not None
        and trainer.iteration >= trainer.schedule.total_iters
        and state.get("metrics")
    ):
        return trainer.already_finished(state)  # (without final metrics, `fit` evaluates)
    if dist.is_main():
        work_dir.mkdir(parents=True, exist_ok=True)
        save_config(trainer.cfg, work_dir / "config.toml")
    return trainer.fit()


def _resume(trainer: Trainer, state: dict[str, Any]) -> None:
    """Restore the trainer from last.pt, with errors that name the file."""
    path = trainer.work_dir / "last.pt"
    coco = trainer.train_set.coco
    check_same_classes(state, coco.category_ids, coco.path, path)
    try:
        trainer.resume()
    except (CheckpointError, UnsafeFileError):
        raise
    except (KeyError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot resume from it: {first}") from None


__all__ = ["FitResult", "TrainingStopped", "fit"]
