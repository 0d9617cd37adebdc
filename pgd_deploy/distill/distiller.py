"""The PGD distiller: frozen teacher, prediction-guided masks and the per-level KD loss terms.

`build_distiller(cfg, student, device=...)` loads the teacher checkpoint, checks that its head
matches the student's, optionally copies the teacher's FPN and head into the student
(docs/method.md D1; all three in `distill.teacher`) and returns a `Distiller`. Calling the
distiller with the batch images, the student's head outputs and the targets runs the teacher
(eval mode, no grad), builds the masks (docs/method.md §3) and returns the unweighted KD terms
of every level, five per level:
`kd_cls_fg_pN`, `kd_cls_bg_pN`, `kd_cls_att_pN`, `kd_reg_feat_pN`, `kd_reg_att_pN` (N = 3..7).
Their weights (alpha, beta, gamma, delta and the level weights, docs/method.md §4) are the plain
dict `Distiller.loss_weights`, built from the config by `kd_loss_weights`; the engine applies
them, with `train.loss_weights`, in one place.

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

import numpy as np
import torch
from torch import Tensor

from pgd_deploy.config import DistillConfig
from pgd_deploy.distill.losses import cls_distill_terms, reg_distill_terms
from pgd_deploy.distill.masks import batch_masks, gt_box_masks
from pgd_deploy.distill.teacher import (
    check_compatible,
    freeze,
    init_student_from_teacher,
    load_teacher,
)
from pgd_deploy.models import DenseDetector, DenseOutputs

logger = logging.getLogger(__name__)

__all__ = ["Distiller", "build_distiller", "jitter_generator", "kd_loss_weights", "kd_term_names"]

FIRST_LEVEL = 3  # loss names count FPN levels from P3
JITTER_STREAM = 0x9E3779B9  # keeps the jitter seeds apart from the global seed (train.seed + rank)


def kd_term_names(num_levels: int) -> list[str]:
    """The distiller's loss names, in the order it returns them: level by level from P3,
    kd_cls_fg, kd_cls_bg, kd_cls_att, kd_reg_feat, kd_reg_att."""
    return [
        f"kd_{term}_p{level + FIRST_LEVEL}"
        for level in range(num_levels)
        for term in ("cls_fg", "cls_bg", "cls_att", "reg_feat", "reg_att")
    ]


def kd_loss_weights(cfg: DistillConfig, num_levels: int | None = None) -> dict[str, float]:
    """The weight of every KD term, from the config (docs/method.md §4).

    Level l (weight lambda_l of `cfg.level_weights`): kd_cls_fg = lambda_l * alpha,
    kd_cls_bg = lambda_l * beta, kd_cls_att = delta, kd_reg_feat = gamma, kd_reg_att = delta;
    so the weighted sum of a level's terms is `cls_distill_loss + reg_distill_loss` of it.
    The products are rounded as the float32 losses round lambda_l * (alpha * L_fg), so that
    a float32 training step gets exactly the gradients of those losses (`_float32_product`).

    Args:
        cfg: the distillation settings.
        num_levels: the teacher's FPN levels, checked against `cfg.level_weights` when given.

    Raises:
        ValueError: `cfg.level_weights` does not hold one weight per level.
    """
    if num_levels is not None and len(cfg.level_weights) != num_levels:
        raise ValueError(
            f"distill.level_weights needs one weight per level ({num_levels}), "
            f"got {tuple(cfg.level_weights)}"
        )
    weights = {}
    for level, level_weight in enumerate(cfg.level_weights):
        name = f"p{level + FIRST_LEVEL}"
        weights[f"kd_cls_fg_{name}"] = _float32_product(level_weight, cfg.alpha)
        weights[f"kd_cls_bg_{name}"] = _float32_product(level_weight, cfg.beta)
        weights[f"kd_cls_att_{name}"] = cfg.delta
        weights[f"kd_reg_feat_{name}"] = cfg.gamma
        weights[f"kd_reg_att_{name}"] = cfg.delta
    return weights


def _float32_product(a: float, b: float) -> float:
    """a * b with both factors and the product rounded to float32.

    `cls_distill_loss` computes lambda_l * (alpha * L) in float32, so L receives the gradient
    float32(float32(lambda_l) * float32(alpha)). The float64 product, rounded once, can differ
    from it in the last bit, and training amplifies that into visibly different weights (a
    20-step run moved them by 0.3 % in norm). Rounded like the loss, the engine's weights give
    the same gradients bit for bit, so runs are unchanged by the move of the weights out of the
    loss. (gamma and delta need nothing: the loss multiplies by them alone, as the engine does.)
    """
    return float(np.float32(a) * np.float32(b))


def jitter_generator(device: str | torch.device, *, seed: int, rank: int = 0) -> torch.Generator:
    """The mask-jitter generator of one process: on `device` (where the masks are computed),
    seeded from the training seed and the process rank (each rank draws its own jitter)."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed((seed * 1_000_003 + rank + JITTER_STREAM) % 2**63)
    return generator


class Distiller:
    """Unweighted PGD loss terms of a student against a frozen teacher (no parameters).

    Call: `distiller(images [B, 3, H, W], student_outputs, targets) -> dict[str, Tensor]` with
    the keys `kd_term_names(levels)`. `loss_weights` holds one weight per key (DETR's
    `weight_dict`): the engine multiplies each term by its weight; the distiller never does.
    """

    def __init__(
        self,
        *,
        teacher: DenseDetector,
        loss_weights: Mapping[str, float] | None = None,
        temperature: float = 0.8,
        topk: int = 30,
        xi_cls: float = 0.8,
        xi_reg: float = 0.6,
        mask_group: int | None = 4,
        jitter: float = 0.05,
        swap_xy: bool = False,
        teacher_score: str = "class",
        index_stride: bool = False,
        mask_source: str = "pgd",
        generator: torch.Generator | None = None,
    ) -> None:
        if mask_source not in ("pgd", "gt_box"):
            raise ValueError(f"distill.masks must be 'pgd' or 'gt_box', got {mask_source!r}")
        if teacher_score not in ("class", "detection"):
            raise ValueError(
                f"distill.teacher_score must be 'class' or 'detection', got {teacher_score!r}"
            )
        if topk < 1:
            raise ValueError(f"distill.topk must be >= 1, got {topk}")
        if mask_group is not None and mask_group < 1:
            raise ValueError(f"distill.mask_group must be None or >= 1, got {mask_group}")
        names = kd_term_names(len(teacher.strides))
        if loss_weights is None:  # the config's defaults
            loss_weights = kd_loss_weights(DistillConfig(), len(teacher.strides))
        if set(loss_weights) != set(names):
            missing = [k for k in names if k not in loss_weights]
            unexpected = [k for k in loss_weights if k not in names]
            raise ValueError(
                f"loss_weights needs one weight per KD term of the {len(teacher.strides)} "
                f"levels: missing {missing}, unexpected {unexpected}"
            )
        self.teacher = freeze(teacher)
        self.loss_weights = {name: float(loss_weights[name]) for name in names}
        self.temperature = temperature
        self.topk = topk
        self.xi_cls, self.xi_reg = xi_cls, xi_reg
        self.mask_group = mask_group
        self.jitter = jitter
        self.swap_xy = swap_xy
        self.teacher_score = teacher_score
        self.index_stride = index_stride
        self.mask_source = mask_source
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
        student_outputs: DenseOutputs,
        targets: Sequence[Mapping[str, Tensor]],
    ) -> dict[str, Tensor]:
        """Unweighted KD terms of one batch.

        Args:
            images: [B, 3, H, W] the exact batch tensor the student saw.
            student_outputs: the student's head outputs for `images` (taps with gradient).
            targets: B dicts with "boxes" [G, 4] xyxy px and "labels" [G] int64.

        Returns:
            {"kd_cls_fg_p3": scalar, ..., "kd_reg_att_p7": scalar} in `kd_term_names` order:
            the terms of `cls_distill_terms` and `reg_distill_terms` of each level, fp32.

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
            cls_terms = cls_distill_terms(
                student_outputs.cls_taps[level],
                teacher_outputs.cls_taps[level],
                cls_mask,
                bg_mask,
                temperature=self.temperature,
                mask_group=group,
            )
            reg_terms = reg_distill_terms(
                student_outputs.reg_taps[level],
                teacher_outputs.reg_taps[level],
                reg_mask,
                temperature=self.temperature,
            )
            losses.update({f"kd_cls_{term}_{name}": v for term, v in cls_terms.items()})
            losses.update({f"kd_reg_{term}_{name}": v for term, v in reg_terms.items()})
        return losses

    def teacher_forward(self, images: Tensor) -> DenseOutputs:
        """Teacher head outputs in eval mode without gradient (docs/method.md §5, D7)."""
        self.teacher.eval()
        with torch.no_grad():
            return self.teacher(images)

    @torch.no_grad()
    def masks(
        self, teacher_outputs: DenseOutputs, targets: Sequence[Mapping[str, Tensor]]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """PGW cls mask, PGW reg mask and background mask of every image, each [B, A] fp32.

        With `mask_source="gt_box"` both foreground masks are `gt_box_masks`' (1 inside any GT
        box): the same losses without the teacher's prediction guidance.
        """
        if self.mask_source == "gt_box":
            centers = self.teacher.priors(teacher_outputs).centers  # [A, 2]
            fg, bg = gt_box_masks(centers, [t["boxes"] for t in targets], swap_xy=self.swap_xy)
            return fg.float(), fg.float(), bg.float()
        # The head's guidance: class logits [B, A, C] (times its quality branch only with
        # teacher_score "detection") and decoded boxes [B, A, 4] px at its priors' centres.
        logits, boxes, priors = self.teacher.guidance(
            teacher_outputs,
            with_quality=self.teacher_score == "detection",
            # D4: the official per-GPU batch is the mask group (4); without one, the batch
            index_stride_group=(self.mask_group or len(targets)) if self.index_stride else None,
        )
        (fg_cls, fg_reg), bg = batch_masks(
            logits,
            boxes,
            priors.centers,
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
    """[B, A] -> per level [B, H_l, W_l], by level index, not by matching sizes (docs/method.md
    D6)."""
    chunks = torch.split(masks, [h * w for h, w in sizes], dim=1)
    return [c.reshape(masks.shape[0], h, w) for c, (h, w) in zip(chunks, sizes, strict=True)]


def _check_taps(student: DenseOutputs, teacher: DenseOutputs) -> None:
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
        ValueError: no teacher configured, unreadable teacher, incompatible heads, or not one
            level weight per teacher level.
    """
    if not cfg.teacher:
        raise ValueError("distill.teacher is empty: no teacher checkpoint to distil from")
    teacher = load_teacher(cfg.teacher, device=device, default_depth=cfg.teacher_depth)
    check_compatible(teacher, student)
    if cfg.init_student:
        init_student_from_teacher(student, teacher)
    if generator is None:
        generator = jitter_generator(device, seed=seed, rank=rank)
    return Distiller(
        teacher=teacher,
        loss_weights=kd_loss_weights(cfg, len(teacher.strides)),
        temperature=cfg.temperature,
        topk=cfg.topk,
        xi_cls=cfg.xi_cls,
        xi_reg=cfg.xi_reg,
        mask_group=cfg.mask_group,
        jitter=cfg.jitter,
        swap_xy=cfg.swap_xy,
        teacher_score=cfg.teacher_score,
        index_stride=cfg.index_stride,
        mask_source=cfg.masks,
        generator=generator,
    )
