"""Two-process DDP on the CPU (slow): `pgd-train fit` under torch.distributed.run writes rank 0's
checkpoints only, and the ranks of one DDP step hold the same weights after stepping on
different data."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _trainer_helpers import ROOT

from pgd_deploy.config import TrainJob, load_config
from pgd_deploy.models import load_detector

# DDP runs the training kernels: `make test-isa` runs these
pytestmark = pytest.mark.trained


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path):
    """`pgd-train fit` under torchrun: two CPU processes finish, and only rank 0 writes the
    run's files. That the ranks step together (DDP averages their gradients) is held by
    test_two_process_ranks_step_together_on_different_data, which fails when the model is not
    wrapped in DistributedDataParallel (this one alone still passes then)."""
    work = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    overrides = [
        "model.depth=18",
        "model.fpn_channels=64",
        f"data.cache_dir='{tmp_path / 'cache'}'",
        "data.shapes_train=8",
        "data.shapes_val=4",
        "data.shapes_size=64",
        "data.min_size=64",
        "data.max_size=64",
        "data.workers=0",
        "train.batch_size=2",
        "train.max_iters=3",
        "train.device='cpu'",
        "train.warmup_iters=1",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "pgd_deploy.cli",
        "fit",
        "--recipe",
        str(ROOT / "train" / "quickstart_student.toml"),
        "--work-dir",
        str(work),
    ]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    loaded = load_detector(work / "last.pt", device="cpu")
    state, cfg = loaded.checkpoint, loaded.config
    assert state["iteration"] == 3 and cfg.model.depth == 18
    assert state["config"]["train"]["batch_size"] == 2
    assert sorted(p.name for p in work.glob("*.pt")) == ["best.pt", "last.pt"]  # rank 0 only


DDP_SCRIPT = """
import sys
import torch
from pgd_deploy import distributed as dist
from pgd_deploy.config import TrainJob, load_config
from pgd_deploy.trainer import fit

work, overrides = sys.argv[1], sys.argv[2:]
seen = {"batches": []}


def make_loss_provider(model, device):
    seen["model"] = model  # the detector inside the DDP wrapper, freshly initialised
    seen["initial"] = {n: p.detach().clone() for n, p in model.named_parameters()}

    def record(images, outputs, targets):
        seen["batches"].append((images.detach().cpu(), [dict(t) for t in targets]))
        return {}

    return record


assert fit(load_config(TrainJob, None, overrides), work_dir=work,
           make_loss_provider=make_loss_provider).completed
params = {n: p.detach().cpu().clone() for n, p in seen["model"].named_parameters()}
state = {"initial": seen["initial"], "params": params, "batches": seen["batches"]}
torch.save(state, f"{work}/rank{dist.rank()}.pt")
"""


@pytest.mark.slow
def test_two_process_ranks_step_together_on_different_data(tmp_path):
    """After one DDP step on different data the ranks hold identical weights (the gradients
    were averaged), which differ from a single-process step on one rank's data."""
    import dataclasses

    from pgd_deploy.data.dataset import Batch
    from pgd_deploy.engine import StepContext, train_step
    from pgd_deploy.models import build_detector
    from pgd_deploy.schedule import Schedule, build_optimizer, build_scheduler

    overrides = [
        "model.depth=18",
        "model.fpn_channels=64",
        "model.head_convs=2",
        f"data.cache_dir='{tmp_path / 'cache'}'",
        "data.shapes_train=8",
        "data.shapes_val=2",
        "data.shapes_size=64",
        "data.min_size=64",
        "data.max_size=64",
        "data.workers=0",
        "train.batch_size=2",
        "train.max_iters=1",
        "train.warmup_iters=0",
        "train.base_lr=0.02",
        "train.base_batch=4",
        "train.device='cpu'",
        "train.amp='off'",
    ]
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_SCRIPT)
    work = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    proc = subprocess.run(
        [*cmd, str(script), str(work), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rank0, rank1 = (torch.load(work / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    (images0, targets0), (images1, _) = rank0["batches"][0], rank1["batches"][0]
    assert len(rank0["batches"]) == len(rank1["batches"]) == 1
    assert not torch.equal(images0, images1)  # each rank stepped on its own images
    differ = [n for n, p in rank0["params"].items() if not torch.equal(p, rank1["params"][n])]
    assert not differ, f"ranks disagree on {len(differ)} parameters, e.g. {differ[:3]}"

    # The same step in one process, on rank 0's batch alone (same initial weights and lr).
    cfg = load_config(TrainJob, None, overrides)
    torch.manual_seed(cfg.train.seed)
    model = build_detector(dataclasses.replace(cfg.model, num_classes=3))
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(torch.equal(initial[n], p) for n, p in rank0["initial"].items())
    schedule = Schedule.from_config(cfg.train, iters_per_epoch=2, world_size=2)
    optimizer = build_optimizer(model, cfg.train, schedule.lr)
    ctx = StepContext(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, schedule),
        device=torch.device("cpu"),
    )
    train_step(ctx, Batch(images0, targets0, list(range(len(targets0))), [], []))
    solo = dict(model.named_parameters())
    moved = [n for n in initial if not torch.equal(initial[n], rank0["params"][n])]
    assert len(moved) > len(initial) // 2  # the DDP step changed the weights...
    assert any(not torch.equal(solo[n].detach(), rank0["params"][n]) for n in moved)  # ...jointly
    assert any(not torch.equal(solo[n].detach(), initial[n]) for n in initial)
