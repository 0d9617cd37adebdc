"""Shared by the training tests (test_trainer*.py): the tiny training configuration, loss
providers that interrupt a run, and weight comparisons. test_anchor_heads, test_gpu, test_qat and
test_toy_head still import some of them through test_trainer, which re-exports them."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from pgd_deploy.checkpoint import load_checkpoint
from pgd_deploy.config import TrainJob, load_config

ROOT = Path(__file__).resolve().parents[1]


def tiny_overrides(cache: Path, *extra: str) -> list[str]:
    """R18 with a 64-channel FPN on 64 px synthetic images: seconds per run on a CPU."""
    return [
        "model.depth=18",
        "model.fpn_channels=64",
        f"data.cache_dir='{cache}'",
        "data.shapes_train=8",
        "data.shapes_val=4",
        "data.shapes_size=64",
        "data.min_size=64",
        "data.max_size=64",
        "data.workers=0",
        "train.batch_size=2",
        "train.base_lr=0.01",
        "train.base_batch=8",
        "train.warmup_iters=2",
        "train.device='cpu'",
        "train.log_every=1",
        "train.deterministic=true",
        *extra,
    ]


def tiny_cfg(cache: Path, *extra: str) -> TrainJob:
    return load_config(TrainJob, None, tiny_overrides(cache, *extra))


class Interrupt:
    """A loss provider that stops the run at call `at` (never when 0) and otherwise adds a
    stochastic term drawn from the global torch, numpy and Python random streams, as dropout or
    a random augmentation would: a resume that does not restore all three changes the weights."""

    def __init__(self, at: int = 0, error: type[BaseException] = KeyboardInterrupt) -> None:
        self.at, self.calls, self.error = at, 0, error

    def __call__(self, images, outputs, targets):
        self.calls += 1
        if self.calls == self.at:
            raise self.error("interrupted by the test")
        noise = torch.rand(()).item() + random.random() + float(np.random.rand())
        return {"loss_noise": outputs.cls_logits[0].mean() * noise}


class InterruptAt:
    """Wraps a loss provider: calls it, except that call number `at` raises KeyboardInterrupt.

    Attributes (the distiller's `teacher`, `state_dict`, ...) are the wrapped provider's.
    """

    def __init__(self, inner, at: int) -> None:
        self.inner, self.at, self.calls = inner, at, 0

    def __call__(self, images, outputs, targets):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt("interrupted by the test")
        return self.inner(images, outputs, targets)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = checkpoint_weights(a), checkpoint_weights(b)
    assert wa.keys() == wb.keys()
    differ = [key for key in wa if not torch.equal(wa[key], wb[key])]
    assert not differ, f"{len(differ)} of {len(wa)} tensors differ, e.g. {differ[:3]}"
