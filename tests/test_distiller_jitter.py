"""Tests of the distiller's mask-jitter generator (`jitter_generator`): seeded by seed and rank,
its state saved in and restored from a checkpoint, on the CPU and on CUDA."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from _distiller_helpers import gt_targets
from _models import narrow_fcos, r18_fcos

from pgd_deploy.checkpoint import load_checkpoint, save_checkpoint
from pgd_deploy.config import DistillConfig
from pgd_deploy.distill import Distiller, build_distiller, jitter_generator


def _jittered_masks(distiller: Distiller) -> torch.Tensor:
    torch.manual_seed(123)  # the global stream must not matter
    teacher_outputs = distiller.teacher_forward(torch.ones(2, 3, 64, 64))
    fg_cls, fg_reg, _ = distiller.masks(teacher_outputs, gt_targets())
    torch.rand(10)  # nor draws from it between calls
    return torch.stack([fg_cls, fg_reg])


def test_jitter_generator_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    teacher = narrow_fcos(seed=1)
    first = Distiller(teacher=teacher, generator=jitter_generator("cpu", seed=0))
    draw1 = _jittered_masks(first)
    save_checkpoint({"model": {}, "config": {}, "jitter": first.state_dict()}, tmp_path / "c.pt")
    draw2 = _jittered_masks(first)
    assert not torch.equal(draw1, draw2)  # the stream advances: the jitter is on
    # the same seed gives the same stream...
    same_seed = Distiller(teacher=teacher, generator=jitter_generator("cpu", seed=0))
    assert torch.equal(_jittered_masks(same_seed), draw1)
    # ...and a distiller of another seed, restored from the checkpoint, continues the first one's
    state = load_checkpoint(tmp_path / "c.pt")["jitter"]
    assert state["device"] == "cpu" and state["generator"].dtype == torch.uint8
    resumed = Distiller(teacher=teacher, generator=jitter_generator("cpu", seed=5))
    resumed.load_state_dict(state)
    assert torch.equal(_jittered_masks(resumed), draw2)
    assert Distiller(teacher=teacher).state_dict() == {}  # no generator: nothing to save


def test_jitter_generator_seeds_differ_by_seed_and_rank() -> None:
    draws = {
        (seed, rank): torch.rand(4, generator=jitter_generator("cpu", seed=seed, rank=rank))
        for seed, rank in ((0, 0), (0, 1), (1, 0))
    }
    assert torch.equal(
        draws[0, 0], torch.rand(4, generator=jitter_generator("cpu", seed=0, rank=0))
    )
    assert not torch.equal(draws[0, 0], draws[0, 1])
    assert not torch.equal(draws[0, 0], draws[1, 0])
    # not the global stream of the same seed (seed_everything uses train.seed + rank)
    assert not torch.equal(draws[0, 0], torch.rand(4, generator=torch.Generator().manual_seed(0)))


def test_build_distiller_gives_a_seeded_generator_on_the_device(r18_checkpoint: Path) -> None:
    cfg = DistillConfig(teacher=str(r18_checkpoint))
    a = build_distiller(cfg, r18_fcos(seed=5), device="cpu", seed=7, rank=1)
    b = build_distiller(cfg, r18_fcos(seed=5), device="cpu", seed=7, rank=1)
    assert a.generator is not None and a.generator.device.type == "cpu"
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert torch.equal(a.generator.get_state(), jitter_generator("cpu", seed=7, rank=1).get_state())


def test_jitter_state_of_another_device_type_is_refused_with_a_warning(caplog) -> None:
    distiller = Distiller(teacher=narrow_fcos(seed=1), generator=jitter_generator("cpu", seed=0))
    before = distiller.generator.get_state()
    with caplog.at_level(logging.WARNING, logger="pgd_deploy.distill.distiller"):
        distiller.load_state_dict(
            {"generator": torch.zeros(16, dtype=torch.uint8), "device": "cuda"}
        )
    assert torch.equal(distiller.generator.get_state(), before)
    assert "not bit-exact" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_jitter_generator_state_round_trips(tmp_path: Path) -> None:
    """A CUDA generator's state is a CPU ByteTensor; a checkpoint loaded with map_location=cuda
    moves it to the GPU, and restoring it must still work."""
    teacher = narrow_fcos(seed=1).cuda()
    distiller = Distiller(teacher=teacher, generator=jitter_generator("cuda", seed=0))
    state = distiller.state_dict()
    assert state["device"] == "cuda" and state["generator"].device.type == "cpu"
    save_checkpoint({"model": {}, "config": {}, "jitter": state}, tmp_path / "c.pt")
    images = torch.ones(2, 3, 64, 64, device="cuda")
    targets = [{k: v.cuda() for k, v in t.items()} for t in gt_targets()]
    expected = distiller.masks(distiller.teacher_forward(images), targets)
    restored = load_checkpoint(tmp_path / "c.pt", map_location="cuda")["jitter"]
    other = Distiller(teacher=teacher, generator=jitter_generator("cuda", seed=99))
    other.load_state_dict(restored)
    got = other.masks(other.teacher_forward(images), targets)
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)


def test_load_state_dict_without_a_generator_state_changes_nothing() -> None:
    distiller = Distiller(teacher=narrow_fcos(), generator=jitter_generator("cpu", seed=0))
    before = distiller.generator.get_state()
    distiller.load_state_dict({})  # e.g. a checkpoint of a run without distillation
    assert torch.equal(distiller.generator.get_state(), before)
    plain = Distiller(teacher=narrow_fcos())
    plain.load_state_dict({"generator": before, "device": "cpu"})  # no generator: nothing to set
    assert plain.generator is None


def test_a_generator_state_without_its_device_is_a_cpu_state() -> None:
    source = jitter_generator("cpu", seed=3)
    state = source.get_state()
    distiller = Distiller(teacher=narrow_fcos(), generator=jitter_generator("cpu", seed=0))
    distiller.load_state_dict({"generator": state})  # no "device" key: saved on the CPU
    assert torch.equal(distiller.generator.get_state(), state)
