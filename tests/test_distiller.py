"""Tests of pgd_deploy.distill.distiller: a full PGD step, teacher loading, student init."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from pgd_deploy.checkpoint import load_checkpoint, save_checkpoint
from pgd_deploy.config import DistillConfig, ModelConfig, TrainJob, to_dict
from pgd_deploy.distill import (
    Distiller,
    background_mask,
    build_distiller,
    cls_distill_loss,
    jitter_generator,
    pgw_mask,
    quality_score,
    reg_distill_loss,
)
from pgd_deploy.models import build_detector
from pgd_deploy.models.fcos import flatten_levels

KD_KEYS = [f"kd_{kind}_p{level}" for kind in ("cls", "reg") for level in range(3, 8)]


def _r18(num_classes: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return build_detector(ModelConfig(depth=18), num_classes=num_classes)


def _narrow(seed: int = 0):
    """R18 with a 64-channel, 2-conv head: the cheap model of the tests below."""
    torch.manual_seed(seed)
    cfg = ModelConfig(depth=18, fpn_channels=64, head_convs=2)
    return build_detector(cfg, num_classes=3)


def _targets():
    return [
        {
            "boxes": torch.tensor([[8.0, 10, 70, 90], [40, 30, 120, 110]]),
            "labels": torch.tensor([0, 2]),
        },
        {"boxes": torch.tensor([[20.0, 20, 60, 50]]), "labels": torch.tensor([1])},
    ]


@pytest.fixture(scope="module")
def r18_checkpoint(tmp_path_factory) -> Path:
    """A project checkpoint (pgd_deploy.checkpoint format) of a random R18 FCOS, 3 classes."""
    model = _r18(seed=1)
    job = TrainJob(model=ModelConfig(depth=18, num_classes=3))
    path = tmp_path_factory.mktemp("ckpt") / "teacher.pt"
    save_checkpoint({"model": model.state_dict(), "config": to_dict(job)}, path)
    return path


def test_full_distillation_step_updates_only_the_student(caplog) -> None:
    teacher, student = _narrow(seed=1), _narrow(seed=2)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    distiller = Distiller(teacher=teacher, generator=torch.Generator().manual_seed(0))
    teacher.train()  # e.g. an engine calling model.train() on everything: eval is re-applied
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.01)
    images = torch.randn(2, 3, 96, 96)

    student.train()
    outputs = student(images)
    with caplog.at_level(logging.INFO, logger="pgd_deploy.distill.distiller"):
        kd = distiller(images, outputs, _targets())
    losses = {**student.loss(outputs, _targets()), **kd}
    total = sum(losses.values())
    optimizer.zero_grad()
    total.backward()
    optimizer.step()

    assert list(kd) == KD_KEYS
    assert all(torch.isfinite(v) and v.dim() == 0 for v in kd.values())
    assert all(kd[f"kd_cls_p{level}"].item() > 0 for level in range(3, 8))  # bg everywhere
    assert kd["kd_reg_p3"].item() > 0  # the top-K of these boxes includes P3 locations
    assert "groups of 2" in caplog.text  # batch 2, mask_group 4 -> groups of 2, logged
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert any(k.startswith("head.towers.cls_tower.0") for k in changed)
    assert any(k.startswith("backbone.body.") for k in changed)


def test_distiller_masks_match_the_public_functions() -> None:
    teacher = _narrow(seed=1)
    distiller = Distiller(teacher=teacher, jitter=0.0, topk=9)
    images = torch.randn(2, 3, 96, 96)
    outputs = distiller.teacher_forward(images)
    fg_cls, fg_reg, bg = distiller.masks(outputs, _targets())
    num_locations = sum(h * w for h, w in teacher.feature_sizes(outputs))
    assert fg_cls.shape == fg_reg.shape == bg.shape == (2, num_locations)
    centers, _ = teacher.points(outputs)
    boxes = teacher.decode_boxes(outputs)
    logits = flatten_levels(outputs.cls_logits)
    for i, target in enumerate(_targets()):
        for xi, mask in ((0.8, fg_cls), (0.6, fg_reg)):
            q = quality_score(logits[i], boxes[i], target["boxes"], target["labels"], xi)
            torch.testing.assert_close(mask[i], pgw_mask(q, centers, target["boxes"], 9, 0.0))
        torch.testing.assert_close(bg[i], background_mask(centers, target["boxes"]))
    assert (fg_cls > 0).any() and (bg == 0).any()


def test_distiller_no_gt_and_student_equal_teacher() -> None:
    teacher = _narrow(seed=1)
    distiller = Distiller(teacher=teacher, mask_group=None)
    images = torch.randn(2, 3, 64, 64)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    # Same weights: identical taps, so every term (features and attention) is zero.
    student = _narrow(seed=1).eval()  # eval: BatchNorm uses the same statistics as the teacher
    kd = distiller(images, student(images), empty)
    assert all(v.item() == 0.0 for v in kd.values())
    # Another student, no GT: cls losses are background-only and finite, reg losses exactly 0
    # yet graph-connected.
    student = _narrow(seed=2)
    kd = distiller(images, student(images), empty)
    assert all(kd[f"kd_cls_p{level}"].item() > 0 for level in range(3, 8))
    assert all(kd[f"kd_reg_p{level}"].item() == 0 for level in range(3, 8))
    sum(kd.values()).backward()
    assert student.head.towers.cls_tower[0][0].weight.grad is not None


def test_distiller_group_size_resolution() -> None:
    distiller = Distiller(teacher=_r18(), mask_group=4)
    assert [distiller._group_size(b) for b in (1, 2, 3, 4, 6, 8, 9)] == [1, 2, 3, 4, 3, 4, 3]
    assert Distiller(teacher=_r18(), mask_group=None)._group_size(6) is None


def test_distiller_rejects_mismatched_taps() -> None:
    distiller = Distiller(teacher=_narrow())
    student = _narrow()
    with pytest.raises(ValueError, match="cls_taps"):
        distiller(torch.randn(2, 3, 64, 64), student(torch.randn(2, 3, 96, 96)), _targets())


def test_build_distiller_inits_student(r18_checkpoint: Path) -> None:
    student = _r18(seed=5)
    cfg = DistillConfig(teacher=str(r18_checkpoint), topk=9, mask_group=None)
    distiller = build_distiller(cfg, student, device="cpu")
    assert distiller.topk == 9 and distiller.mask_group is None
    assert torch.equal(student.head.cls_logits.weight, distiller.teacher.head.cls_logits.weight)
    cfg = dataclasses.replace(cfg, init_student=False)
    fresh = _r18(seed=6)
    build_distiller(cfg, fresh, device="cpu")
    assert not torch.equal(
        fresh.head.towers.cls_tower[0][0].weight,
        distiller.teacher.head.towers.cls_tower[0][0].weight,
    )
    with pytest.raises(ValueError, match="distill.teacher"):
        build_distiller(DistillConfig(), student, device="cpu")


# --------------------------------------------------------------------------------------------
# Per-level losses and the mask-jitter generator
# --------------------------------------------------------------------------------------------


def test_each_level_loss_uses_that_levels_taps_masks_and_weight() -> None:
    """kd_cls_pN / kd_reg_pN are the public losses of level N's taps and masks, with level N's
    weight (P3 the first, 1.0, P7 the last, 2.0)."""
    teacher, student = _narrow(seed=1), _narrow(seed=2)
    weights = (1.0, 1.25, 1.5, 1.75, 2.0)
    distiller = Distiller(teacher=teacher, jitter=0.0, mask_group=None, level_weights=weights)
    images = torch.randn(2, 3, 96, 96)
    outputs = student(images)
    kd = distiller(images, outputs, _targets())
    teacher_outputs = distiller.teacher_forward(images)
    fg_cls, fg_reg, bg = distiller.masks(teacher_outputs, _targets())
    start = 0
    for level, (h, w) in enumerate(teacher.feature_sizes(teacher_outputs)):
        cut = slice(start, start + h * w)
        start += h * w
        masks = [m[:, cut].reshape(2, h, w) for m in (fg_cls, fg_reg, bg)]
        common = {"temperature": 0.8, "delta": 0.0008}
        cls = cls_distill_loss(
            outputs.cls_taps[level],
            teacher_outputs.cls_taps[level],
            masks[0],
            masks[2],
            alpha=0.04,
            beta=0.02,
            level_weight=weights[level],
            **common,
        )
        reg = reg_distill_loss(
            outputs.reg_taps[level],
            teacher_outputs.reg_taps[level],
            masks[1],
            gamma=0.064,
            **common,
        )
        torch.testing.assert_close(kd[f"kd_cls_p{level + 3}"], cls, rtol=1e-6, atol=0)
        torch.testing.assert_close(kd[f"kd_reg_p{level + 3}"], reg, rtol=1e-6, atol=0)
    # the level weight scales the feature terms: not a no-op on these inputs
    plain = Distiller(teacher=teacher, jitter=0.0, mask_group=None, level_weights=(1.0,) * 5)
    plain_kd = plain(images, outputs, _targets())
    assert plain_kd["kd_cls_p3"] == kd["kd_cls_p3"] and plain_kd["kd_cls_p7"] < kd["kd_cls_p7"]


def _jittered_masks(distiller: Distiller) -> torch.Tensor:
    torch.manual_seed(123)  # the global stream must not matter
    teacher_outputs = distiller.teacher_forward(torch.ones(2, 3, 64, 64))
    fg_cls, fg_reg, _ = distiller.masks(teacher_outputs, _targets())
    torch.rand(10)  # nor draws from it between calls
    return torch.stack([fg_cls, fg_reg])


def test_jitter_generator_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    teacher = _narrow(seed=1)
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
    a = build_distiller(cfg, _r18(seed=5), device="cpu", seed=7, rank=1)
    b = build_distiller(cfg, _r18(seed=5), device="cpu", seed=7, rank=1)
    assert a.generator is not None and a.generator.device.type == "cpu"
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert torch.equal(a.generator.get_state(), jitter_generator("cpu", seed=7, rank=1).get_state())


def test_jitter_state_of_another_device_type_is_refused_with_a_warning(caplog) -> None:
    distiller = Distiller(teacher=_narrow(seed=1), generator=jitter_generator("cpu", seed=0))
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
    teacher = _narrow(seed=1).cuda()
    distiller = Distiller(teacher=teacher, generator=jitter_generator("cuda", seed=0))
    state = distiller.state_dict()
    assert state["device"] == "cuda" and state["generator"].device.type == "cpu"
    save_checkpoint({"model": {}, "config": {}, "jitter": state}, tmp_path / "c.pt")
    images = torch.ones(2, 3, 64, 64, device="cuda")
    targets = [{k: v.cuda() for k, v in t.items()} for t in _targets()]
    expected = distiller.masks(distiller.teacher_forward(images), targets)
    restored = load_checkpoint(tmp_path / "c.pt", map_location="cuda")["jitter"]
    other = Distiller(teacher=teacher, generator=jitter_generator("cuda", seed=99))
    other.load_state_dict(restored)
    got = other.masks(other.teacher_forward(images), targets)
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Defaults, argument checks and wrappers (survivors of `make mutate`)
# --------------------------------------------------------------------------------------------


def test_distiller_defaults_are_the_config_defaults() -> None:
    distiller, cfg = Distiller(teacher=_narrow()), DistillConfig()
    for name in ("temperature", "alpha", "beta", "gamma", "delta", "topk", "xi_cls", "xi_reg"):
        assert getattr(distiller, name) == getattr(cfg, name), name
    assert distiller.level_weights == cfg.level_weights and distiller.mask_group == cfg.mask_group
    assert distiller.jitter == cfg.jitter == 0.05 and distiller.swap_xy is cfg.swap_xy is False


def test_distiller_argument_checks() -> None:
    teacher = _narrow()
    assert Distiller(teacher=teacher, topk=1, mask_group=1).topk == 1  # the smallest valid values
    with pytest.raises(ValueError, match="^distill.topk must be >= 1, got 0$"):
        Distiller(teacher=teacher, topk=0)
    with pytest.raises(ValueError, match="^distill.mask_group must be None or >= 1, got 0$"):
        Distiller(teacher=teacher, mask_group=0)
    with pytest.raises(ValueError, match=r"one weight per level \(5\), got \(1.0, 2.0\)$"):
        Distiller(teacher=teacher, level_weights=(1.0, 2.0))
    distiller = Distiller(teacher=teacher)
    outputs = _narrow()(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"B = len\(targets\) = 2, got \(3, 64, 64\)$"):
        distiller(torch.randn(3, 64, 64), outputs, _targets())
    with pytest.raises(ValueError, match=r"B = len\(targets\) = 1, got \(2, 3, 64, 64\)$"):
        distiller(torch.randn(2, 3, 64, 64), outputs, _targets()[:1])


def test_uneven_group_is_logged_once_per_batch_size(caplog) -> None:
    distiller = Distiller(teacher=_narrow(), mask_group=4)
    with caplog.at_level(logging.INFO, logger="pgd_deploy.distill.distiller"):
        assert [distiller._group_size(b) for b in (6, 6, 3, 8)] == [3, 3, 3, 4]
    assert caplog.text.count("batch of 6 images") == 1 and caplog.text.count("batch of 3") == 1
    assert "batch of 8" not in caplog.text  # divisible: nothing to say


def test_load_state_dict_without_a_generator_state_changes_nothing() -> None:
    distiller = Distiller(teacher=_narrow(), generator=jitter_generator("cpu", seed=0))
    before = distiller.generator.get_state()
    distiller.load_state_dict({})  # e.g. a checkpoint of a run without distillation
    assert torch.equal(distiller.generator.get_state(), before)
    plain = Distiller(teacher=_narrow())
    plain.load_state_dict({"generator": before, "device": "cpu"})  # no generator: nothing to set
    assert plain.generator is None


def test_wrapped_models_are_unwrapped() -> None:
    class Wrapper(torch.nn.Module):  # what DistributedDataParallel looks like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    teacher, student = _narrow(seed=1), _narrow(seed=2)
    check_compatible(Wrapper(teacher), Wrapper(student))
    with pytest.raises(ValueError, match="tower width: teacher 64 vs student 256"):
        check_compatible(Wrapper(teacher), Wrapper(_r18()))
    copied, _ = init_student_from_teacher(Wrapper(student), Wrapper(teacher))
    assert "head.cls_logits.weight" in copied
    assert torch.equal(student.head.cls_logits.weight, teacher.head.cls_logits.weight)


def test_plain_state_dict_of_a_narrow_head_infers_its_width_and_depth(tmp_path: Path) -> None:
    model = _narrow(seed=3)
    path = tmp_path / "narrow.pt"
    torch.save(model.state_dict(), path)
    teacher = load_teacher(path, device="cpu", default_depth=18)
    assert teacher.head.towers.cls_tower[0][0].out_channels == 64
    assert len(teacher.head.towers.cls_tower) == 2 and teacher.num_classes == 3


def test_build_distiller_passes_every_setting_on(r18_checkpoint: Path) -> None:
    cfg = DistillConfig(
        teacher=str(r18_checkpoint),
        alpha=0.1,
        beta=0.2,
        gamma=0.3,
        delta=0.4,
        temperature=0.5,
        topk=7,
        xi_cls=0.7,
        xi_reg=0.4,
        level_weights=(5.0, 4.0, 3.0, 2.0, 1.0),
        mask_group=2,
        jitter=0.3,
        swap_xy=True,
    )
    distiller = build_distiller(cfg, _r18(seed=5), device="cpu")
    for name in ("alpha", "beta", "gamma", "delta", "temperature", "topk", "xi_cls", "xi_reg"):
        assert getattr(distiller, name) == getattr(cfg, name), name
    assert distiller.level_weights == cfg.level_weights and distiller.mask_group == 2
    assert distiller.jitter == 0.3 and distiller.swap_xy is True


def test_a_generator_state_without_its_device_is_a_cpu_state() -> None:
    source = jitter_generator("cpu", seed=3)
    state = source.get_state()
    distiller = Distiller(teacher=_narrow(), generator=jitter_generator("cpu", seed=0))
    distiller.load_state_dict({"generator": state})  # no "device" key: saved on the CPU
    assert torch.equal(distiller.generator.get_state(), state)
