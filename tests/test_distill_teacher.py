"""Tests of pgd_deploy.distill.teacher: loading a frozen teacher, compatibility, student init."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _models import narrow_fcos, r18_fcos

from pgd_deploy.config import DistillConfig, ModelConfig, TrainJob, to_dict
from pgd_deploy.distill import (
    build_distiller,
    check_compatible,
    init_student_from_teacher,
    load_teacher,
)
from pgd_deploy.models import build_detector


def test_load_teacher_project_checkpoint(r18_checkpoint: Path) -> None:
    teacher = load_teacher(r18_checkpoint, device="cpu")  # default_depth 101 is not used
    reference = r18_fcos(seed=1)
    assert teacher.num_classes == 3 and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    for name, value in reference.state_dict().items():
        assert torch.equal(teacher.state_dict()[name], value), name


def test_load_teacher_classes_key_and_plain_state_dict(tmp_path: Path) -> None:
    model = r18_fcos(num_classes=5, seed=3)
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
    torch.save({"model": r18_fcos(num_classes=4).state_dict(), "config": to_dict(job)}, bad_head)
    with pytest.raises(ValueError, match="bad_head.pt.*3 classes"):
        load_teacher(bad_head, device="cpu")


def test_incompatible_heads_are_rejected(r18_checkpoint: Path) -> None:
    teacher = r18_fcos(num_classes=3)
    with pytest.raises(ValueError, match="classes: teacher 3 vs student 5"):
        check_compatible(teacher, r18_fcos(num_classes=5))
    with pytest.raises(ValueError, match="tower depth.*tower width"):
        check_compatible(teacher, narrow_fcos())
    cfg = DistillConfig(teacher=str(r18_checkpoint))
    with pytest.raises(ValueError, match="classes"):
        build_distiller(cfg, r18_fcos(num_classes=5), device="cpu")


def test_init_student_from_teacher_r18_to_r50() -> None:
    teacher = r18_fcos(seed=1)
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


def test_wrapped_models_are_unwrapped() -> None:
    class Wrapper(torch.nn.Module):  # what DistributedDataParallel looks like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    teacher, student = narrow_fcos(seed=1), narrow_fcos(seed=2)
    check_compatible(Wrapper(teacher), Wrapper(student))
    with pytest.raises(ValueError, match="tower width: teacher 64 vs student 256"):
        check_compatible(Wrapper(teacher), Wrapper(r18_fcos()))
    copied, _ = init_student_from_teacher(Wrapper(student), Wrapper(teacher))
    assert "head.cls_logits.weight" in copied
    assert torch.equal(student.head.cls_logits.weight, teacher.head.cls_logits.weight)


def test_plain_state_dict_of_a_narrow_head_infers_its_width_and_depth(tmp_path: Path) -> None:
    model = narrow_fcos(seed=3)
    path = tmp_path / "narrow.pt"
    torch.save(model.state_dict(), path)
    teacher = load_teacher(path, device="cpu", default_depth=18)
    assert teacher.head.towers.cls_tower[0][0].out_channels == 64
    assert len(teacher.head.towers.cls_tower) == 2 and teacher.num_classes == 3
