"""Tests of pgd_deploy.schedule: linear LR scaling, warm-up, step decays, optimisers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from pgd_deploy.config import TrainConfig
from pgd_deploy.schedule import Schedule, build_optimizer, build_scheduler

# The paper's set-up: base_lr 0.01 quoted for a global batch of 16.
CFG = TrainConfig(
    base_lr=0.01,
    base_batch=16,
    batch_size=2,
    epochs=12,
    lr_steps=(8.0, 11.0),
    lr_gamma=0.1,
    warmup_iters=500,
    warmup_ratio=0.001,
)


def _schedule(world_size: int = 1, iters_per_epoch: int = 100, **changes) -> Schedule:
    cfg = dataclasses.replace(CFG, **changes)
    return Schedule.from_config(cfg, iters_per_epoch=iters_per_epoch, world_size=world_size)


@pytest.mark.parametrize(
    ("batch_size", "world_size", "lr"),
    [(2, 8, 0.01), (2, 1, 0.00125), (4, 8, 0.02), (16, 1, 0.01), (2, 4, 0.005)],
)
def test_linear_scaling_uses_the_global_batch(batch_size, world_size, lr) -> None:
    """lr = base_lr * batch_size * world_size / base_batch (8 GPUs x 2 images = the paper)."""
    schedule = _schedule(world_size, batch_size=batch_size)
    assert schedule.lr == pytest.approx(lr, rel=1e-12)


def test_epoch_schedule_steps_at_epoch_boundaries() -> None:
    schedule = _schedule(iters_per_epoch=100)
    assert schedule.total_iters == 1200 and schedule.iters_per_epoch == 100
    assert schedule.steps == (800, 1100)
    assert (schedule.warmup_iters, schedule.warmup_ratio, schedule.gamma) == (500, 0.001, 0.1)
    fractional = _schedule(iters_per_epoch=10, lr_steps=(2.25, 2.75), epochs=3)
    assert fractional.steps == (22, 28) and fractional.total_iters == 30


def test_max_iters_replaces_the_epochs_and_scales_the_steps() -> None:
    schedule = _schedule(iters_per_epoch=7, max_iters=300)
    assert schedule.total_iters == 300
    assert schedule.steps == (200, 275)  # epochs 8 and 11 of 12 -> 8/12 and 11/12 of 300
    assert schedule.iters_per_epoch == 7
    single = _schedule(iters_per_epoch=7, max_iters=1)  # one iteration is a valid run
    assert single.total_iters == 1 and single.steps == (1, 1)
    one_epoch = _schedule(max_iters=100, epochs=1, lr_steps=(0.5,))
    assert one_epoch.steps == (50,)


def test_factor_warms_up_linearly_then_decays_in_steps() -> None:
    schedule = _schedule(iters_per_epoch=100, warmup_iters=10, warmup_ratio=0.1)
    assert schedule.factor(0) == pytest.approx(0.1)
    assert schedule.factor(5) == pytest.approx(0.55)  # halfway from 0.1 to 1
    assert schedule.factor(9) == pytest.approx(0.91)
    assert schedule.factor(10) == 1.0 and schedule.factor(799) == 1.0
    assert schedule.factor(800) == pytest.approx(0.1)  # first step, inclusive
    assert schedule.factor(1099) == pytest.approx(0.1)
    assert schedule.factor(1100) == pytest.approx(0.01)
    # a decay that falls inside the warm-up multiplies the warm-up factor
    early = _schedule(iters_per_epoch=1, warmup_iters=10, warmup_ratio=0.1, lr_steps=(0.0, 5.0))
    assert early.factor(0) == pytest.approx(0.1 * 0.1)
    assert early.factor(5) == pytest.approx(0.55 * 0.01)
    none = _schedule(warmup_iters=0)
    assert none.factor(0) == 1.0


def test_bad_schedules_are_errors() -> None:
    with pytest.raises(ValueError, match="^the training set yields no batch per epoch$"):
        _schedule(iters_per_epoch=0)
    message = r"^config key 'train.epochs': must be >= 1 when train.max_iters is 0"
    with pytest.raises(ValueError, match=message):  # refused when the config is built
        _schedule(epochs=0)
    assert _schedule(epochs=1, iters_per_epoch=1).total_iters == 1


def test_describe_names_the_numbers() -> None:
    text = _schedule(8, iters_per_epoch=100).describe(global_batch=16)
    assert text == (
        "schedule: 1200 iterations (12.00 epochs of 100), global batch 16, peak lr 0.01, "
        "warm-up 500, steps at [800, 1100]"
    )


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.trained = nn.Linear(2, 1)


def test_build_optimizer_sgd_and_adamw_over_trainable_parameters() -> None:
    net = _Net()
    sgd = build_optimizer(net, dataclasses.replace(CFG, momentum=0.8, weight_decay=0.01), 0.5)
    assert isinstance(sgd, torch.optim.SGD)
    (group,) = sgd.param_groups
    assert group["lr"] == 0.5 and group["momentum"] == 0.8 and group["weight_decay"] == 0.01
    assert {id(p) for p in group["params"]} == {id(p) for p in net.trained.parameters()}
    cfg = dataclasses.replace(CFG, optimizer="adamw", momentum=0.8, weight_decay=0.05)
    adamw = build_optimizer(net, cfg, 0.002)
    assert isinstance(adamw, torch.optim.AdamW)
    (group,) = adamw.param_groups
    assert group["lr"] == 0.002 and group["betas"] == (0.8, 0.999)  # momentum is beta1
    assert group["weight_decay"] == 0.05 and group["fused"]
    assert len(group["params"]) == 2


def test_scheduler_sets_the_lr_of_every_iteration() -> None:
    schedule = _schedule(iters_per_epoch=2, warmup_iters=4, warmup_ratio=0.2, max_iters=8)
    assert schedule.steps == (5, 7)
    net = _Net()
    optimizer = build_optimizer(net, CFG, schedule.lr)
    scheduler = build_scheduler(optimizer, schedule)
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [schedule.lr * schedule.factor(it) for it in range(8)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[0] == pytest.approx(0.2 * schedule.lr) and seen[5] == pytest.approx(0.1 * seen[4])
    # the state dict holds no schedule object: it is rebuilt from the config on resume
    assert set(scheduler.state_dict()["lr_lambdas"]) <= {None}
