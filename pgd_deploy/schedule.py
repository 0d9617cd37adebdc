"""Optimiser and learning-rate schedule (docs/method.md §5).

SGD with the linear scaling rule (lr = base_lr * global_batch / base_batch), linear warm-up from
`warmup_ratio`, and step decays at epochs `lr_steps`. When `train.max_iters` is set it replaces
the epoch schedule and the steps scale with it (step s of E epochs -> iteration s / E * max_iters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pgd_deploy.config import TrainConfig


@dataclass(frozen=True)
class Schedule:
    """Iteration-level schedule. `factor(it)` multiplies the peak learning rate `lr`."""

    lr: float
    total_iters: int
    iters_per_epoch: int
    warmup_iters: int
    warmup_ratio: float
    steps: tuple[int, ...]
    gamma: float

    @classmethod
    def from_config(cls, cfg: TrainConfig, *, iters_per_epoch: int, world_size: int) -> Schedule:
        if iters_per_epoch < 1:
            raise ValueError("the training set yields no batch per epoch")
        lr = cfg.base_lr * cfg.batch_size * world_size / cfg.base_batch
        if cfg.max_iters > 0:
            total = cfg.max_iters
            steps = tuple(round(s / max(cfg.epochs, 1) * total) for s in cfg.lr_steps)
        else:
            total = cfg.epochs * iters_per_epoch
            steps = tuple(round(s * iters_per_epoch) for s in cfg.lr_steps)
        if total < 1:
            raise ValueError("train.epochs or train.max_iters must give at least one iteration")
        return cls(
            lr, total, iters_per_epoch, cfg.warmup_iters, cfg.warmup_ratio, steps, cfg.lr_gamma
        )

    def factor(self, it: int) -> float:
        """LR multiplier before optimisation step `it` (0-based)."""
        decay = self.gamma ** sum(it >= s for s in self.steps)
        if it < self.warmup_iters:
            warm = 1.0 - (1.0 - it / self.warmup_iters) * (1.0 - self.warmup_ratio)
            return warm * decay
        return decay

    def describe(self, global_batch: int) -> str:
        epochs = self.total_iters / self.iters_per_epoch
        return (
            f"schedule: {self.total_iters} iterations ({epochs:.2f} epochs of "
            f"{self.iters_per_epoch}), global batch {global_batch}, peak lr "
            f"{self.lr:.4g}, warm-up {self.warmup_iters}, steps at {list(self.steps)}"
        )


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """SGD (or AdamW) over the trainable parameters (frozen stages and a teacher are excluded)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        # The fused kernel (CPU and CUDA) is measurably faster than the per-tensor loop.
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return torch.optim.AdamW(
            params, lr=lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay, fused=fused
        )
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: Schedule
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration scheduler (call `.step()` after every optimiser step)."""
    # A plain function (not a bound method) keeps the schedule itself out of the state dict:
    # on resume it is rebuilt from the config.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: schedule.factor(it))
