"""The PGD distiller: frozen teacher, prediction-guided masks and the 10 per-level KD losses.

`build_distiller(cfg, student, device=...)` loads the teacher checkpoint, checks that its head
matches the student's, optionally copies the teacher's FPN and head into the student (P1; all
three in `distill.teacher`) and returns a `Distiller`. Calling the distiller with the batch
images, the student's head outputs and the targets runs the teacher (eval mode, no grad), builds
the masks (section 2.13) and returns the named KD losses `kd_cls_p3..p7`, `kd_reg_p3..p7`.

In training (`build_distiller`) the mask jitter draws from the distiller's own `torch.Generator`
(`jitter_generator`), not from the global stream: nothing else that draws from the global
generator (a DataLoader creating its iterator, a dropout layer) can shift it, and its state
travels in the training checkpoint (`Distiller.state_dict`), so an interrupted and resumed run
draws the same jitter as a straight one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from pgd_deploy.config import DistillConfig
from pgd_deploy.distill.losses import cls_distill_loss, reg_distill_loss
from pgd_deploy.distill.masks import batch_masks
from pgd_deploy.distill.teacher import (
    check_compatible,
    freeze,
    init_student_from_teacher,
    load_teacher,
)
from pgd_deploy.models import DenseDetector, HeadOutputs
from pgd_deploy.models.fcos import flatten_levels

logger = logging.getLogger(__name__)

__all__ = ["Distiller", "build_distiller", "jitter_generator"]

FIRST_LEVEL = 3  # loss names count FPN levels from P3
JITTER_STREAM = 0x9E3779B9  # keeps the jitter seeds apart from the global seed (train.seed + rank)


def jitter_generator(device: str | torch.device, *, seed: int, rank: int = 0) -> torch.Generator:
    """The mask-jitter generator of one process: on `device` (where the masks are computed),
    seeded from the training seed and the process rank (each rank draws its own jitter)."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed((seed * 1_000_003 + rank + JITTER_STREAM) % 2**63)
    return generator


class Distiller:
    """PGD losses of a student against a frozen teacher (no parameters of its own).

    Call: `distiller(images [B, 3, H, W], student_outputs, targets) -> dict[str, Tensor]` with
    keys `kd_cls_p3..kd_cls_p7` and `kd_reg_p3..kd_reg_p7`. The hyperparameters (alpha, beta,
    gamma, delta, level weights) are applied inside each loss; the engine sums the dict as is.
    """

    def __init__(
        self,
        *,
        teacher: DenseDetector,
        temperature: float = 0.8,
        alpha: float = 0.04,
        beta: float = 0.02,
        gamma: float = 0.064,
        delta: float = 0.0008,
        topk: int = 30,
        xi_cls: float = 0.8,
        xi_reg: float = 0.6,
        level_weights: Sequence[float] = (1.0, 1.25, 1.5, 1.75, 2.0),
        mask_group: int | None = 4,
        jitter: float = 0.05,
        swap_xy: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        if topk < 1:
            raise ValueError(f"distill.topk must be >= 1, got {topk}")
        if mask_group is not None and mask_group < 1:
            raise ValueError(f"distill.mask_group must be None or >= 1, got {mask_group}")
        if len(level_weights) != len(teacher.strides):
            raise ValueError(
                f"distill.level_weights needs one weight per level ({len(teacher.strides)}), "
                f"got {tuple(level_weights)}"
            )
        self.teacher = freeze(teacher)
        self.temperature = temperature
        self.alpha, self.beta, self.gamma, self.delta = alpha, beta, gamma, delta
        self.topk = topk
        self.xi_cls, self.xi_reg = xi_cls, xi_reg
        self.level_weights = tuple(float(w) for w in level_weights)
        self.mask_group = mask_group
        self.jitter = jitter
        self.swap_xy = swap_xy
        self.generator = generator  # None: the jitter draws from the global generator
        self._logged_groups: set[int] = set()

    def state_dict(self) -> dict[str, Any]:
        """The jitter generator's state, for the training checkpoint ({} without a generator).

        Returns:
            {"generator": CPU ByteTensor (also for a CUDA generator), "device": "cpu" | "cuda"}.
        """
        if self.generator is None:
            return {}
        return {"generator": self.generator.get_state(), "device": self.generator.device.type}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the jitter generator saved by `state_dict` (resume).

        A state saved on another device type (a CPU run resumed on a GPU, or the reverse) cannot
        be restored: the generator keeps its seed, with a warning that the jitter stream differs.
        """
        if self.generator is None or "generator" not in state:
            return
        if state.get("device", "cpu") != self.generator.device.type:
            logger.warning(
                "the checkpoint's mask-jitter generator ran on %s, this run's on %s: the jitter "
                "stream restarts from the seed (the resumed run is not bit-exact)",
                state.get("device"),
                self.generator.device.type,
            )
            return
        # A generator state is a CPU ByteTensor; map_location may have moved it to the GPU.
        self.generator.set_state(state["generator"].cpu())

    def __call__(
        self,
        images: Tensor,
        student_outputs: HeadOutputs,
        targets: Sequence[Mapping[str, Tensor]],
    ) -> dict[str, Tensor]:
        """KD losses of one batch.

        Args:
            images: [B, 3, H, W] the exact batch tensor the student saw.
            student_outputs: the student's head outputs for `images` (taps with gradient).
            targets: B dicts with "boxes" [G, 4] xyxy px and "labels" [G] int64.

        Returns:
            {"kd_cls_p3": scalar, ..., "kd_reg_p7": scalar}, fp32.

        Raises:
            ValueError: batch size or tap shapes differ between images, targets, student, teacher.
        """
        if images.dim() != 4 or images.shape[0] != len(targets):
            raise ValueError(
                f"images must be [B, 3, H, W] with B = len(targets) = {len(targets)}, "
                f"got {tuple(images.shape)}"
            )
        teacher_outputs = self.teacher_forward(images)
        _check_taps(student_outputs, teacher_outputs)
        fg_cls, fg_reg, bg = self.masks(teacher_outputs, targets)  # [B, A] each
        sizes = self.teacher.feature_sizes(teacher_outputs)
        group = self._group_size(images.shape[0])
        losses: dict[str, Tensor] = {}
        levels = zip(
            _split_levels(fg_cls, sizes),
            _split_levels(fg_reg, sizes),
            _split_levels(bg, sizes),
            strict=True,
        )
        for level, (cls_mask, reg_mask, bg_mask) in enumerate(levels):  # [B, H_l, W_l] each
            name = f"p{level + FIRST_LEVEL}"
            losses[f"kd_cls_{name}"] = cls_distill_loss(
                student_outputs.cls_taps[level],
                teacher_outputs.cls_taps[level],
                cls_mask,
                bg_mask,
                temperature=self.temperature,
                alpha=self.alpha,
                beta=self.beta,
                delta=self.delta,
                level_weight=self.level_weights[level],
                mask_group=group,
            )
            losses[f"kd_reg_{name}"] = reg_distill_loss(
                student_outputs.reg_taps[level],
                teacher_outputs.reg_taps[level],
                reg_mask,
                temperature=self.temperature,
                gamma=self.gamma,
                delta=self.delta,
            )
        order = [
            f"kd_{kind}_p{level + FIRST_LEVEL}"
            for kind in ("cls", "reg")
            for level in range(len(sizes))
        ]
        return {key: losses[key] for key in order}

    def teacher_forward(self, images: Tensor) -> HeadOutputs:
        """Teacher head outputs in eval mode without gradient (P11)."""
        self.teacher.eval()
        with torch.no_grad():
            return self.teacher(images)

    @torch.no_grad()
    def masks(
        self, teacher_outputs: HeadOutputs, targets: Sequence[Mapping[str, Tensor]]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """PGW cls mask, PGW reg mask and background mask of every image, each [B, A] fp32."""
        centers, _ = self.teacher.points(teacher_outputs)  # [A, 2]
        boxes = self.teacher.decode_boxes(teacher_outputs)  # [B, A, 4]
        logits = flatten_levels(teacher_outputs.cls_logits).float()  # [B, A, C]
        (fg_cls, fg_reg), bg = batch_masks(
            logits,
            boxes,
            centers,
            [target["boxes"] for target in targets],
            [target["labels"] for target in targets],
            (self.xi_cls, self.xi_reg),
            self.topk,
            self.jitter,
            self.generator,
            swap_xy=self.swap_xy,
        )
        return fg_cls.float(), fg_reg.float(), bg.float()

    def _group_size(self, batch: int) -> int | None:
        """`mask_group`, or its largest divisor of `batch` below it (logged once per batch)."""
        if self.mask_group is None:
            return None
        group = max(d for d in range(1, min(self.mask_group, batch) + 1) if batch % d == 0)
        if group != self.mask_group and batch not in self._logged_groups:
            self._logged_groups.add(batch)
            logger.info(
                "batch of %d images is not divisible by distill.mask_group=%d: "
                "broadcasting masks within groups of %d",
                batch,
                self.mask_group,
                group,
            )
        return group


def _split_levels(masks: Tensor, sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """[B, A] -> per level [B, H_l, W_l], by level index (not by matching sizes, P19)."""
    chunks = torch.split(masks, [h * w for h, w in sizes], dim=1)
    return [c.reshape(masks.shape[0], h, w) for c, (h, w) in zip(chunks, sizes, strict=True)]


def _check_taps(student: HeadOutputs, teacher: HeadOutputs) -> None:
    pairs = (
        ("cls_taps", student.cls_taps, teacher.cls_taps),
        ("reg_taps", student.reg_taps, teacher.reg_taps),
    )
    for name, s_taps, t_taps in pairs:
        if len(s_taps) != len(t_taps):
            raise ValueError(f"student has {len(s_taps)} {name} levels, the teacher {len(t_taps)}")
        for level, (s, t) in enumerate(zip(s_taps, t_taps, strict=True)):
            if s.shape != t.shape:
                raise ValueError(
                    f"{name}[{level}]: student shape {tuple(s.shape)} differs from the teacher's "
                    f"{tuple(t.shape)}; both must see the same batch tensor and share the head "
                    "layout"
                )


def build_distiller(
    cfg: DistillConfig,
    student: DenseDetector,
    *,
    device: str | torch.device,
    generator: torch.Generator | None = None,
    seed: int = 0,
    rank: int = 0,
) -> Distiller:
    """Load the teacher of `cfg`, check it against `student`, init the student, build the distiller.

    Args:
        cfg: the distillation settings.
        student: the freshly built student (initialised from the teacher when
            `cfg.init_student`).
        device: where the teacher runs and the masks are computed.
        generator: the mask-jitter generator; None = `jitter_generator(device, seed=seed,
            rank=rank)`.
        seed, rank: the training seed and process rank the default generator derives from.

    Raises:
        ValueError: no teacher configured, unreadable teacher, incompatible heads.
    """
    if not cfg.teacher:
        raise ValueError("distill.teacher is empty: no teacher checkpoint to distil from")
    teacher = load_teacher(cfg.teacher, device=device, default_depth=cfg.teacher_depth)
    check_compatible(teacher, student)
    if cfg.init_student:
        init_student_from_teacher(student, teacher)
    if cfg.gfl_stride_bug:
        logger.warning("distill.gfl_stride_bug has no effect on an FCOS teacher")
    if generator is None:
        generator = jitter_generator(device, seed=seed, rank=rank)
    return Distiller(
        teacher=teacher,
        temperature=cfg.temperature,
        alpha=cfg.alpha,
        beta=cfg.beta,
        gamma=cfg.gamma,
        delta=cfg.delta,
        topk=cfg.topk,
        xi_cls=cfg.xi_cls,
        xi_reg=cfg.xi_reg,
        level_weights=cfg.level_weights,
        mask_group=cfg.mask_group,
        jitter=cfg.jitter,
        swap_xy=cfg.swap_xy,
        generator=generator,
    )
