"""Tests of pgd_deploy.distill.distiller: a full PGD step, teacher loading, student init."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from pgd_deploy.checkpoint import save_checkpoint
from pgd_deploy.config import DistillConfig, ModelConfig, TrainJob, to_dict
from pgd_deploy.distill import (
    Distiller,
    background_mask,
    build_distiller,
    check_compatible,
    init_student_from_teacher,
    load_teacher,
    pgw_mask,
    quality_score,
)
from pgd_deploy.models import build_detector
from pgd_deploy.models.fcos import flatten_levels

KD_KEYS = [f"kd_{kind}_p{level}" for kind in ("cls", "reg") for level in range(3, 8)]


def _r18(num_classes: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return build_detector(ModelConfig(depth=18), num_classes=num_classes)


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
    teacher, student = _r18(seed=1), _r18(seed=2)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    distiller = Distiller(teacher=teacher, generator=torch.Generator().manual_seed(0))
    teacher.train()  # e.g. an engine calling model.train() on everything: eval is re-applied
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.01)
    images = torch.randn(2, 3, 128, 128)

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
    teacher = _r18(seed=1)
    distiller = Distiller(teacher=teacher, jitter=0.0, topk=9)
    images = torch.randn(2, 3, 128, 128)
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
    teacher = _r18(seed=1)
    distiller = Distiller(teacher=teacher, mask_group=None)
    images = torch.randn(2, 3, 64, 64)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    # Same weights: identical taps, so every term (features and attention) is zero.
    student = _r18(seed=1).eval()  # eval: BatchNorm uses the same statistics as the teacher
    kd = distiller(images, student(images), empty)
    assert all(v.item() == 0.0 for v in kd.values())
    # Another student, no GT: cls losses are background-only and finite, reg losses exactly 0
    # yet graph-connected.
    student = _r18(seed=2)
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
    distiller = Distiller(teacher=_r18())
    student = _r18()
    with pytest.raises(ValueError, match="cls_taps"):
        distiller(torch.randn(2, 3, 64, 64), student(torch.randn(2, 3, 96, 96)), _targets())


# --------------------------------------------------------------------------------------------
# Loading, compatibility, init
# --------------------------------------------------------------------------------------------


def test_load_teacher_project_checkpoint(r18_checkpoint: Path) -> None:
    teacher = load_teacher(r18_checkpoint, device="cpu")  # default_depth 101 is not used
    reference = _r18(seed=1)
    assert teacher.num_classes == 3 and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    for name, value in reference.state_dict().items():
        assert torch.equal(teacher.state_dict()[name], value), name


def test_load_teacher_classes_key_and_plain_state_dict(tmp_path: Path) -> None:
    model = _r18(num_classes=5, seed=3)
    job = TrainJob(model=ModelConfig(depth=18))  # num_classes = 0: from "classes"
    # An untagged {"model", "config", "classes"} dict written by plain torch.save.
    path = tmp_path / "with_classes.pt"
    torch.save(
        {"model": model.state_dict(), "config": to_dict(job), "classes": list("abcde")}, path
    )
    assert load_teacher(path, device="cpu").num_classes == 5
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    teacher = load_teacher(plain, device="cpu", default_depth=18)
    assert teacher.num_classes == 5
    with pytest.raises(ValueError, match="plain.pt"):
        load_teacher(plain, device="cpu", default_depth=34)  # R34 does not fit R18 weights


def test_load_teacher_clear_errors(r18_checkpoint: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(r18_checkpoint.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated.pt"):
        load_teacher(truncated, device="cpu")
    with pytest.raises(ValueError, match="missing.pt"):
        load_teacher(tmp_path / "missing.pt", device="cpu")
    not_ckpt = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_ckpt)
    with pytest.raises(ValueError, match="not a detector checkpoint"):
        load_teacher(not_ckpt, device="cpu")
    # The config says 3 classes, the weights hold 4: an incompatible head.
    bad_head = tmp_path / "bad_head.pt"
    job = TrainJob(model=ModelConfig(depth=18, num_classes=3))
    torch.save({"model": _r18(num_classes=4).state_dict(), "config": to_dict(job)}, bad_head)
    with pytest.raises(ValueError, match="bad_head.pt.*3 classes"):
        load_teacher(bad_head, device="cpu")


def test_incompatible_heads_are_rejected(r18_checkpoint: Path) -> None:
    teacher = _r18(num_classes=3)
    with pytest.raises(ValueError, match="classes: teacher 3 vs student 5"):
        check_compatible(teacher, _r18(num_classes=5))
    narrow = build_detector(ModelConfig(depth=18, fpn_channels=64, head_convs=2), num_classes=3)
    with pytest.raises(ValueError, match="tower depth.*tower width"):
        check_compatible(teacher, narrow)
    cfg = DistillConfig(teacher=str(r18_checkpoint))
    with pytest.raises(ValueError, match="classes"):
        build_distiller(cfg, _r18(num_classes=5), device="cpu")


def test_init_student_from_teacher_r18_to_r50() -> None:
    teacher = _r18(seed=1)
    torch.manual_seed(2)
    student = build_detector(ModelConfig(depth=50), num_classes=3)
    body_before = {
        k: v.clone() for k, v in student.state_dict().items() if k.startswith("backbone.body.")
    }
    copied, skipped = init_student_from_teacher(student, teacher)
    # The three 1x1 lateral weights differ in input channels; their biases ([256]) fit and are
    # copied, as MMDetection's non-strict load does.
    assert sorted(skipped) == [f"backbone.fpn.inner_blocks.{i}.0.weight" for i in range(3)]
    assert "backbone.fpn.inner_blocks.0.0.bias" in copied
    assert any(k.startswith("backbone.fpn.layer_blocks.") for k in copied)
    assert any(k.startswith("backbone.fpn.extra_blocks.") for k in copied)
    student_state, teacher_state = student.state_dict(), teacher.state_dict()
    head = [k for k in teacher_state if k.startswith("head.")]
    assert head and set(head) <= set(copied)
    for name in copied:
        assert torch.equal(student_state[name], teacher_state[name]), name
    for name in skipped:
        assert not torch.equal(
            student_state[name].flatten()[:10], teacher_state[name].flatten()[:10]
        )
    for name, value in body_before.items():
        assert torch.equal(student_state[name], value), name


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
