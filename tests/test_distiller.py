"""Tests of pgd_deploy.distill.distiller: a full PGD step, teacher loading, student init."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pgd_deploy.checkpoint import load_checkpoint, save_checkpoint
from pgd_deploy.config import DistillConfig, ModelConfig, TrainJob, to_dict
from pgd_deploy.distill import (
    Distiller,
    background_mask,
    build_distiller,
    cls_distill_loss,
    gt_box_masks,
    jitter_generator,
    kd_loss_weights,
    kd_term_names,
    pgw_mask,
    quality_score,
    reg_distill_loss,
)
from pgd_deploy.engine import weighted_sum
from pgd_deploy.models import build_detector
from pgd_deploy.models.fcos import flatten_levels

KD_KEYS = [
    f"kd_{term}_p{level}"
    for level in range(3, 8)
    for term in ("cls_fg", "cls_bg", "cls_att", "reg_feat", "reg_att")
]
LEVELS = range(3, 8)


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
    total = weighted_sum(losses, distiller.loss_weights)
    optimizer.zero_grad()
    total.backward()
    optimizer.step()

    assert list(kd) == KD_KEYS
    assert all(torch.isfinite(v) and v.dim() == 0 for v in kd.values())
    assert all(kd[f"kd_cls_bg_p{level}"].item() > 0 for level in LEVELS)  # bg everywhere
    assert all(kd[f"kd_cls_att_p{level}"].item() > 0 for level in LEVELS)
    assert kd["kd_cls_fg_p3"].item() > 0 and kd["kd_reg_feat_p3"].item() > 0  # top-K on P3
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
    assert all(kd[f"kd_cls_bg_p{level}"].item() > 0 for level in LEVELS)
    assert all(kd[f"kd_cls_fg_p{level}"].item() == 0 for level in LEVELS)
    assert all(kd[f"kd_reg_{t}_p{level}"].item() == 0 for level in LEVELS for t in ("feat", "att"))
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
    cfg = DistillConfig(
        teacher=str(r18_checkpoint), topk=9, mask_group=None, teacher_score="detection"
    )
    distiller = build_distiller(cfg, student, device="cpu")
    assert distiller.topk == 9 and distiller.mask_group is None
    assert distiller.teacher_score == "detection"
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


def _level_inputs(distiller: Distiller, teacher_outputs, student_outputs, level: int):
    """(student cls tap, teacher cls tap, cls mask, bg mask, student reg tap, teacher reg tap,
    reg mask) of one level, cut from the distiller's [B, A] masks by hand."""
    fg_cls, fg_reg, bg = distiller.masks(teacher_outputs, _targets())
    sizes = distiller.teacher.feature_sizes(teacher_outputs)
    start = sum(h * w for h, w in sizes[:level])
    h, w = sizes[level]
    cls_mask, reg_mask, bg_mask = (
        m[:, start : start + h * w].reshape(-1, h, w) for m in (fg_cls, fg_reg, bg)
    )
    return (
        student_outputs.cls_taps[level],
        teacher_outputs.cls_taps[level],
        cls_mask,
        bg_mask,
        student_outputs.reg_taps[level],
        teacher_outputs.reg_taps[level],
        reg_mask,
    )


def test_weighted_terms_are_the_public_losses_level_by_level() -> None:
    """Weighted by `kd_loss_weights`, the five terms of level N add up to cls_distill_loss +
    reg_distill_loss of level N's taps and masks, with level N's weight (P3 the first, P7 the
    last): the engine's total is the old total, and no level weight is applied to another level."""
    cfg = DistillConfig(alpha=0.04, beta=0.02, gamma=0.064, delta=0.0008)
    teacher, student = _narrow(seed=1), _narrow(seed=2)
    weights = kd_loss_weights(cfg, 5)
    distiller = Distiller(teacher=teacher, loss_weights=weights, jitter=0.0, mask_group=None)
    images = torch.randn(2, 3, 96, 96)
    outputs = student(images)
    kd = distiller(images, outputs, _targets())
    teacher_outputs = distiller.teacher_forward(images)
    expected = []
    for level in range(5):
        s_cls, t_cls, cls_mask, bg_mask, s_reg, t_reg, reg_mask = _level_inputs(
            distiller, teacher_outputs, outputs, level
        )
        common = {"temperature": cfg.temperature, "delta": cfg.delta}
        cls = cls_distill_loss(
            s_cls,
            t_cls,
            cls_mask,
            bg_mask,
            alpha=cfg.alpha,
            beta=cfg.beta,
            level_weight=cfg.level_weights[level],
            **common,
        )
        reg = reg_distill_loss(s_reg, t_reg, reg_mask, gamma=cfg.gamma, **common)
        name = f"p{level + 3}"
        level_terms = {k: v for k, v in kd.items() if k.endswith(name)}
        torch.testing.assert_close(weighted_sum(level_terms, weights), cls + reg, rtol=1e-6, atol=0)
        expected.append(cls + reg)
    torch.testing.assert_close(weighted_sum(kd, weights), sum(expected), rtol=1e-6, atol=0)
    assert kd["kd_cls_fg_p7"] > 0 and kd["kd_cls_bg_p7"] > 0  # P7's weight 2.0 is exercised


def test_weighted_terms_give_the_public_losses_gradients_bit_for_bit() -> None:
    """The engine's weights (float32-rounded products) reproduce the gradients the public
    float32 losses give, exactly: training is unchanged by moving the weights to the engine."""
    cfg = DistillConfig()
    teacher = _narrow(seed=1)
    distiller = Distiller(
        teacher=teacher, loss_weights=kd_loss_weights(cfg, 5), jitter=0.0, mask_group=2
    )
    images = torch.randn(2, 3, 64, 64)
    teacher_outputs = distiller.teacher_forward(images)
    grads = []
    for use_terms in (True, False):
        student = _narrow(seed=2)
        outputs = student(images)
        if use_terms:
            total = weighted_sum(distiller(images, outputs, _targets()), distiller.loss_weights)
        else:
            total = 0
            for level in range(5):
                s_cls, t_cls, cls_mask, bg_mask, s_reg, t_reg, reg_mask = _level_inputs(
                    distiller, teacher_outputs, outputs, level
                )
                total = total + cls_distill_loss(
                    s_cls,
                    t_cls,
                    cls_mask,
                    bg_mask,
                    temperature=cfg.temperature,
                    alpha=cfg.alpha,
                    beta=cfg.beta,
                    delta=cfg.delta,
                    level_weight=cfg.level_weights[level],
                    mask_group=2,
                )
                total = total + reg_distill_loss(
                    s_reg,
                    t_reg,
                    reg_mask,
                    temperature=cfg.temperature,
                    gamma=cfg.gamma,
                    delta=cfg.delta,
                )
        total.backward()
        grads.append([p.grad.clone() for p in student.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_kd_loss_weights_put_each_weight_on_its_own_term() -> None:
    cfg = DistillConfig(
        alpha=2.0, beta=3.0, gamma=5.0, delta=7.0, level_weights=(1.0, 10.0, 100.0, 1e3, 1e4)
    )
    weights = kd_loss_weights(cfg, 5)
    assert list(weights) == kd_term_names(5) == KD_KEYS
    for level, level_weight in zip(LEVELS, cfg.level_weights, strict=True):
        assert weights[f"kd_cls_fg_p{level}"] == level_weight * 2.0
        assert weights[f"kd_cls_bg_p{level}"] == level_weight * 3.0
        assert weights[f"kd_cls_att_p{level}"] == 7.0
        assert weights[f"kd_reg_feat_p{level}"] == 5.0
        assert weights[f"kd_reg_att_p{level}"] == 7.0
    # float32 rounding of the product, as the float32 loss computes lambda_l * (alpha * L)
    assert kd_loss_weights(DistillConfig(), 5)["kd_cls_fg_p4"] == float(
        np.float32(1.25) * np.float32(0.04)
    )
    with pytest.raises(ValueError, match=r"one weight per level \(5\), got \(1.0, 2.0\)$"):
        kd_loss_weights(DistillConfig(level_weights=(1.0, 2.0)), 5)


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
    for name in ("temperature", "topk", "xi_cls", "xi_reg"):
        assert getattr(distiller, name) == getattr(cfg, name), name
    assert distiller.loss_weights == kd_loss_weights(cfg, 5)
    assert distiller.mask_group == cfg.mask_group
    assert distiller.jitter == cfg.jitter == 0.05 and distiller.swap_xy is cfg.swap_xy is False
    assert distiller.teacher_score == cfg.teacher_score == "class"  # the official code's score


def test_distiller_argument_checks() -> None:
    teacher = _narrow()
    assert Distiller(teacher=teacher, topk=1, mask_group=1).topk == 1  # the smallest valid values
    with pytest.raises(ValueError, match="^distill.topk must be >= 1, got 0$"):
        Distiller(teacher=teacher, topk=0)
    with pytest.raises(ValueError, match="^distill.mask_group must be None or >= 1, got 0$"):
        Distiller(teacher=teacher, mask_group=0)
    with pytest.raises(ValueError, match="^distill.teacher_score must be 'class' or 'detection'"):
        Distiller(teacher=teacher, teacher_score="joint")
    four_levels = kd_loss_weights(DistillConfig(level_weights=(1.0, 2.0, 3.0, 4.0)))
    with pytest.raises(ValueError, match=r"missing \['kd_cls_fg_p7', .*\], unexpected \[\]$"):
        Distiller(teacher=teacher, loss_weights=four_levels)
    with pytest.raises(ValueError, match=r"levels: missing \[\], unexpected \['kd_x'\]$"):
        Distiller(teacher=teacher, loss_weights={**kd_loss_weights(DistillConfig()), "kd_x": 1})
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
    for name in ("temperature", "topk", "xi_cls", "xi_reg"):
        assert getattr(distiller, name) == getattr(cfg, name), name
    # alpha, beta, gamma, delta and the level weights: the weights the engine applies
    assert distiller.loss_weights == kd_loss_weights(cfg)
    assert distiller.loss_weights["kd_cls_fg_p3"] == pytest.approx(5.0 * 0.1)
    assert distiller.loss_weights["kd_cls_bg_p7"] == pytest.approx(1.0 * 0.2)
    assert distiller.loss_weights["kd_reg_feat_p5"] == pytest.approx(0.3)
    assert distiller.loss_weights["kd_reg_att_p4"] == pytest.approx(0.4)
    assert distiller.mask_group == 2 and distiller.jitter == 0.3 and distiller.swap_xy is True


def test_a_generator_state_without_its_device_is_a_cpu_state() -> None:
    source = jitter_generator("cpu", seed=3)
    state = source.get_state()
    distiller = Distiller(teacher=_narrow(), generator=jitter_generator("cpu", seed=0))
    distiller.load_state_dict({"generator": state})  # no "device" key: saved on the CPU
    assert torch.equal(distiller.generator.get_state(), state)


def test_gt_box_masks_are_the_boxes_not_the_teacher_predictions() -> None:
    # distill.masks = "gt_box" (the FGD-style ablation): fg = 1 at every centre strictly inside
    # a GT box, bg its complement; whatever the teacher predicts, the masks stay the same.
    images = torch.randn(2, 3, 96, 96)
    masks = []
    for seed in (1, 2):
        distiller = Distiller(teacher=_narrow(seed=seed), mask_source="gt_box")
        masks.append(distiller.masks(distiller.teacher_forward(images), _targets()))
    (fg_cls, fg_reg, bg), other = masks
    for a, b in zip((fg_cls, fg_reg, bg), other, strict=True):
        assert torch.equal(a, b)
    centers, _ = _narrow().points(distiller.teacher_forward(images))
    for i, target in enumerate(_targets()):
        inside = 1.0 - background_mask(centers, target["boxes"])
        assert torch.equal(fg_cls[i], inside) and torch.equal(fg_reg[i], inside)
        assert torch.equal(bg[i], 1.0 - inside)
    pgd = Distiller(teacher=_narrow(seed=1), jitter=0.0)
    pgd_fg, _, pgd_bg = pgd.masks(pgd.teacher_forward(images), _targets())
    assert torch.equal(pgd_bg, bg) and (fg_cls > 0).sum() > (pgd_fg > 0).sum()
    fg, bg = gt_box_masks(centers, [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert (fg == 0).all() and (bg == 1).all() and fg.shape == (2, centers.shape[0])
    with pytest.raises(ValueError, match="distill.masks must be 'pgd' or 'gt_box', got 'x'"):
        Distiller(teacher=_narrow(), mask_source="x")


def test_build_distiller_passes_the_mask_source_on(r18_checkpoint: Path) -> None:
    cfg = DistillConfig(teacher=str(r18_checkpoint), masks="gt_box")
    assert build_distiller(cfg, _r18(seed=5), device="cpu").mask_source == "gt_box"
    assert DistillConfig().masks == Distiller(teacher=_narrow()).mask_source == "pgd"


def test_swap_xy_on_a_non_square_image_drops_objects_right_of_the_height() -> None:
    # distill.swap_xy reads each centre (x, y) as (y, x), as the official FCOS inside test does.
    # On a 64 x 160 (H x W) image every y is below 64, so an object at x in [100, 150] never
    # contains a transposed centre: it gets no foreground and counts as background everywhere.
    images = torch.randn(1, 3, 64, 160)
    target = [{"boxes": torch.tensor([[100.0, 8, 150, 56]]), "labels": torch.tensor([1])}]
    masks = {}
    for swap in (False, True):
        distiller = Distiller(teacher=_narrow(seed=1), jitter=0.0, swap_xy=swap)
        outputs = distiller.teacher_forward(images)
        masks[swap] = distiller.masks(outputs, target)
    centers, _ = _narrow().points(outputs)
    inside = (centers[:, 0] > 100) & (centers[:, 0] < 150) & (centers[:, 1] > 8)
    inside &= centers[:, 1] < 56
    fg_cls, fg_reg, bg = masks[False]
    assert (fg_cls[0] > 0).any() and (fg_reg[0] > 0).any()
    assert ((fg_cls[0] > 0) <= inside).all() and torch.equal(bg[0], (~inside).float())
    fg_cls, fg_reg, bg = masks[True]
    assert (fg_cls == 0).all() and (fg_reg == 0).all() and (bg == 1).all()
