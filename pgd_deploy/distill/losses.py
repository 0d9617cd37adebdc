"""PGD feature-imitation losses of one FPN level (docs/method.md §4).

Pure functions: student and teacher tap features of one level plus the masks in, scalars out.
`cls_distill_terms` and `reg_distill_terms` return the unweighted terms (what the distiller
reports and the engine weighs); `cls_distill_loss` and `reg_distill_loss`, the public contract,
are their weighted sums.
Everything is computed in fp32 (float64 stays float64) whatever the input precision, and the
teacher features and masks are detached here, so no gradient can reach the teacher. The student
attention maps are not detached: the attention-transfer term trains them towards the teacher's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-10  # clamp of the nonzero-count normalisation

__all__ = ["cls_distill_loss", "cls_distill_terms", "reg_distill_loss", "reg_distill_terms"]


def float_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the PGD losses and masks compute in: float64 if any input is float64, else
    float32 (fp16/bf16 inputs are computed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_features(student: Tensor, teacher: Tensor) -> None:
    for name, t in (("student", student), ("teacher", teacher)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t)
            raise ValueError(f"{name} must have shape [N, Ch, H, W], got {shape}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"teacher must have the student's shape [N, Ch, H, W] = {tuple(student.shape)}, "
            f"got {tuple(teacher.shape)}"
        )


def _check_mask(mask: Tensor, name: str, features: Tensor) -> None:
    n, _, h, w = features.shape
    if not isinstance(mask, Tensor) or tuple(mask.shape) != (n, h, w):
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask)
        raise ValueError(f"{name} must have shape [N, H, W] = {(n, h, w)}, got {shape}")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def spatial_attention(features: Tensor, temperature: float) -> Tensor:
    """H*W * softmax over (h, w) of mean_c |F| / T: [N, Ch, H, W] -> [N, H, W]."""
    n, _, h, w = features.shape
    pooled = features.abs().mean(dim=1).reshape(n, h * w) / temperature  # [N, HW]
    return (h * w * F.softmax(pooled, dim=1)).reshape(n, h, w)


def channel_attention(features: Tensor, temperature: float) -> Tensor:
    """Per-pixel Ch * softmax over channels of |F| / T: [N, Ch, H, W] -> [N, Ch, H, W].

    Also accepts [P, Ch] (softmax over dim 1), as the regression loss uses it.
    """
    return features.shape[1] * F.softmax(features.abs() / temperature, dim=1)


def _normalise_by_count(mask: Tensor) -> Tensor:
    """mask [N, H, W] / max(#nonzero per image, 1e-10) (count, not sum, of the weights)."""
    count = (mask != 0).sum(dim=(1, 2), keepdim=True).to(mask.dtype)  # [N, 1, 1]
    return mask / count.clamp(min=EPS)


def _group_sum(x: Tensor, group: int) -> Tensor:
    """[N, H, W] -> [N / group, H, W]: sums over consecutive groups of `group` images."""
    n, h, w = x.shape
    return x.reshape(n // group, group, h, w).sum(dim=1)


def cls_distill_terms(
    student: Tensor,
    teacher: Tensor,
    fg: Tensor,
    bg: Tensor,
    *,
    temperature: float,
    mask_group: int | None = None,
) -> dict[str, Tensor]:
    """Unweighted terms of the classification-tower PGD loss of one level (docs/method.md §4).

    L_fg = 1/N sum_n sum_{c,h,w} fg_hat[n,h,w] * A_sp^T[n,h,w] * A_ch^T[n,c,h,w] * (F^S - F^T)^2
    with fg_hat = fg / max(#nonzero(fg[n]), 1e-10) (L_bg likewise with bg), and
    L_att = sum|A_ch^S - A_ch^T| / (N*H*W) + sum|A_sp^S - A_sp^T| / N.

    Args:
        student: [N, Ch, H, W] student tap features (gradient flows into them).
        teacher: [N, Ch, H, W] teacher tap features (detached here).
        fg: [N, H, W] PGW cls mask (raw weights; count-normalised here).
        bg: [N, H, W] background mask (0/1; count-normalised here).
        temperature: softmax temperature T of the spatial and channel attention.
        mask_group: None = each image uses its own masks (the intended form); n = the official
            cross-image broadcast within consecutive groups of n images, averaged over the groups
            (docs/method.md D2). N must be divisible by n.

    Returns:
        {"fg": L_fg, "bg": L_bg, "att": L_att}, scalars, fp32 (float64 for float64 inputs).

    Raises:
        ValueError: wrong shapes, temperature <= 0, a bad `mask_group`.
    """
    _check_features(student, teacher)
    _check_mask(fg, "fg", student)
    _check_mask(bg, "bg", student)
    _check_temperature(temperature)
    n, _, h, w = student.shape
    if mask_group is not None and (int(mask_group) < 1 or n % int(mask_group)):
        raise ValueError(
            f"mask_group must be None or a positive divisor of N = {n}, got {mask_group}"
        )
    dtype = float_dtype(student, teacher)
    student = student.to(dtype)
    teacher = teacher.detach().to(dtype)
    fg = _normalise_by_count(fg.detach().to(dtype))  # [N, H, W]
    bg = _normalise_by_count(bg.detach().to(dtype))  # [N, H, W]

    spatial_t = spatial_attention(teacher, temperature)  # [N, H, W]
    channel_t = channel_attention(teacher, temperature)  # [N, Ch, H, W]
    spatial_s = spatial_attention(student, temperature)
    channel_s = channel_attention(student, temperature)

    # Teacher-attention-weighted squared error, summed over channels: [N, H, W].
    error = (channel_t * (student - teacher).square()).sum(dim=1) * spatial_t
    if mask_group is None or mask_group == 1:
        loss_fg = (fg * error).sum() / n
        loss_bg = (bg * error).sum() / n
    else:
        # Official (N,1,1,H,W) x (N,C,H,W) broadcast within each group of images: every image's
        # error is weighted by the sum of the group's masks, i.e. sum_hw (sum_m M[m]) (sum_n D[n])
        # / group size per group; the mean over the groups is then the total / N.
        group_error = _group_sum(error, mask_group)  # [N / n, H, W]
        loss_fg = (_group_sum(fg, mask_group) * group_error).sum() / n
        loss_bg = (_group_sum(bg, mask_group) * group_error).sum() / n
    loss_att = (channel_s - channel_t).abs().sum() / (n * h * w) + (
        spatial_s - spatial_t
    ).abs().sum() / n
    return {"fg": loss_fg, "bg": loss_bg, "att": loss_att}


def cls_distill_loss(
    student: Tensor,
    teacher: Tensor,
    fg: Tensor,
    bg: Tensor,
    *,
    temperature: float,
    alpha: float,
    beta: float,
    delta: float,
    level_weight: float,
    mask_group: int | None = None,
) -> Tensor:
    """Classification-tower PGD loss of one level (docs/method.md §4).

    L = level_weight * alpha * L_fg + level_weight * beta * L_bg + delta * L_att, with the terms
    of `cls_distill_terms`.

    Args:
        student, teacher, fg, bg, temperature, mask_group: as in `cls_distill_terms`.
        alpha: foreground weight.
        beta: background weight.
        delta: attention-transfer weight (not multiplied by `level_weight`).
        level_weight: lambda_l of this level, multiplies the fg and bg terms only.

    Returns:
        Scalar loss, fp32 (float64 for float64 inputs).

    Raises:
        ValueError: wrong shapes, temperature <= 0, a bad `mask_group`.
    """
    terms = cls_distill_terms(
        student, teacher, fg, bg, temperature=temperature, mask_group=mask_group
    )
    return level_weight * (alpha * terms["fg"] + beta * terms["bg"]) + delta * terms["att"]


def reg_distill_terms(
    student: Tensor, teacher: Tensor, fg: Tensor, *, temperature: float
) -> dict[str, Tensor]:
    """Unweighted terms of the regression-tower PGD loss of one level (docs/method.md §4).

    Over the set P of locations of the whole batch where fg != 0, with per-pixel channel
    attention a = Ch * softmax_c(|F| / T):
    L_feat = 1/|P| sum_p fg(p) * mean_c a^T_pc (F^S_pc - F^T_pc)^2,
    L_att = 1/|P| sum_p sum_c |a^S_pc - a^T_pc|.
    Both exactly 0 (still connected to the student graph) when P is empty.

    Args:
        student: [N, Ch, H, W] student tap features (gradient flows into them).
        teacher: [N, Ch, H, W] teacher tap features (detached here).
        fg: [N, H, W] raw PGW reg weights (not normalised).
        temperature: channel-attention softmax temperature T.

    Returns:
        {"feat": L_feat, "att": L_att}, scalars, fp32 (float64 for float64 inputs).

    Raises:
        ValueError: wrong shapes or temperature <= 0.
    """
    _check_features(student, teacher)
    _check_mask(fg, "fg", student)
    _check_temperature(temperature)
    dtype = float_dtype(student, teacher)
    fg = fg.detach()
    batch_idx, row_idx, col_idx = torch.nonzero(fg, as_tuple=True)  # P locations each
    if batch_idx.numel() == 0:
        zero = student.to(dtype).sum() * 0.0
        return {"feat": zero, "att": zero}
    # Advanced indexing with the channel slice in the middle puts P first: [P, Ch].
    student_p = student[batch_idx, :, row_idx, col_idx].to(dtype)
    teacher_p = teacher.detach()[batch_idx, :, row_idx, col_idx].to(dtype)
    weight = fg[batch_idx, row_idx, col_idx].to(dtype)  # [P]
    channel_t = channel_attention(teacher_p, temperature)  # [P, Ch]
    channel_s = channel_attention(student_p, temperature)
    num = batch_idx.numel()
    loss_feat = ((channel_t * (student_p - teacher_p).square()).mean(dim=1) * weight).sum() / num
    loss_att = (channel_s - channel_t).abs().sum() / num
    return {"feat": loss_feat, "att": loss_att}


def reg_distill_loss(
    student: Tensor,
    teacher: Tensor,
    fg: Tensor,
    *,
    temperature: float,
    gamma: float,
    delta: float,
) -> Tensor:
    """Regression-tower PGD loss of one level (docs/method.md §4).

    L = gamma * L_feat + delta * L_att, with the terms of `reg_distill_terms`; exactly 0 (still
    connected to the student graph) when fg has no nonzero location.

    Args:
        student, teacher, fg, temperature: as in `reg_distill_terms`.
        gamma: feature-imitation weight.
        delta: attention-transfer weight.

    Returns:
        Scalar loss, fp32 (float64 for float64 inputs).

    Raises:
        ValueError: wrong shapes or temperature <= 0.
    """
    terms = reg_distill_terms(student, teacher, fg, temperature=temperature)
    return gamma * terms["feat"] + delta * terms["att"]
