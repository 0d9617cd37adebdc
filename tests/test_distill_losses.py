"""Tests of pgd_deploy.distill.losses against hand computations and loop references."""

from __future__ import annotations

import math

import pytest
import torch

from pgd_deploy.distill import cls_distill_loss, reg_distill_loss

HYPER = {"temperature": 0.8, "alpha": 0.04, "beta": 0.02, "delta": 0.0008, "level_weight": 1.5}


def _features(n: int = 4, ch: int = 3, h: int = 2, w: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.rand(n, ch, h, w, generator=gen, dtype=torch.float64)
    teacher = torch.rand(n, ch, h, w, generator=gen, dtype=torch.float64)
    fg = torch.rand(n, h, w, generator=gen, dtype=torch.float64)
    fg[fg < 0.5] = 0  # sparse, raw weights
    bg = (torch.rand(n, h, w, generator=gen) < 0.5).double() * (fg == 0)
    fg[-1] = 0  # an image without foreground
    return student, teacher, fg, bg


def _attention(x: torch.Tensor, n: int, h: int, w: int, ch: int, t: float):
    """Spatial [h][w] and channel [c][h][w] attention of image n, with explicit loops."""
    pooled = [
        [sum(abs(x[n, c, i, j].item()) for c in range(ch)) / ch / t for j in range(w)]
        for i in range(h)
    ]
    z = sum(math.exp(v) for row in pooled for v in row)
    spatial = [[h * w * math.exp(pooled[i][j]) / z for j in range(w)] for i in range(h)]
    channel = [[[0.0] * w for _ in range(h)] for _ in range(ch)]
    for i in range(h):
        for j in range(w):
            zc = sum(math.exp(abs(x[n, c, i, j].item()) / t) for c in range(ch))
            for c in range(ch):
                channel[c][i][j] = ch * math.exp(abs(x[n, c, i, j].item()) / t) / zc
    return spatial, channel


def _normalised(mask: torch.Tensor, n: int) -> list[list[float]]:
    count = max(int((mask[n] != 0).sum()), 1e-10)
    return [[v / count for v in row] for row in mask[n].tolist()]


def _reference_cls(
    student, teacher, fg, bg, *, temperature, alpha, beta, delta, level_weight, group=None
):
    """Section 2.8 written out with loops; `group` = the official broadcast, by hand."""
    n_img, ch, h, w = student.shape
    att_s = [_attention(student, n, h, w, ch, temperature) for n in range(n_img)]
    att_t = [_attention(teacher, n, h, w, ch, temperature) for n in range(n_img)]
    fg_hat = [_normalised(fg, n) for n in range(n_img)]
    bg_hat = [_normalised(bg, n) for n in range(n_img)]

    def error(n: int, i: int, j: int) -> float:
        sp, chn = att_t[n]
        return sum(
            sp[i][j] * chn[c][i][j] * (student[n, c, i, j].item() - teacher[n, c, i, j].item()) ** 2
            for c in range(ch)
        )

    loss_fg = loss_bg = 0.0
    if group is None:
        for n in range(n_img):
            for i in range(h):
                for j in range(w):
                    loss_fg += fg_hat[n][i][j] * error(n, i, j)
                    loss_bg += bg_hat[n][i][j] * error(n, i, j)
        loss_fg /= n_img
        loss_bg /= n_img
    else:
        # Per group of `group` images (one official per-GPU batch): the (N,1,1,H,W) mask times the
        # (N,C,H,W) error broadcasts to every (mask image m, feature image n) pair, / group size.
        groups = [list(range(g, g + group)) for g in range(0, n_img, group)]
        for members in groups:
            g_fg = g_bg = 0.0
            for m in members:
                for n in members:
                    for i in range(h):
                        for j in range(w):
                            g_fg += fg_hat[m][i][j] * error(n, i, j)
                            g_bg += bg_hat[m][i][j] * error(n, i, j)
            loss_fg += g_fg / group / len(groups)
            loss_bg += g_bg / group / len(groups)
    loss_att = 0.0
    for n in range(n_img):
        (sp_s, ch_s), (sp_t, ch_t) = att_s[n], att_t[n]
        for i in range(h):
            for j in range(w):
                loss_att += abs(sp_s[i][j] - sp_t[i][j]) / n_img
                for c in range(ch):
                    loss_att += abs(ch_s[c][i][j] - ch_t[c][i][j]) / (n_img * h * w)
    return level_weight * alpha * loss_fg + level_weight * beta * loss_bg + delta * loss_att


def _reference_reg(student, teacher, fg, *, temperature, gamma, delta):
    n_img, ch, h, w = student.shape
    feat = att = 0.0
    count = 0
    for n in range(n_img):
        _, ch_s = _attention(student, n, h, w, ch, temperature)
        _, ch_t = _attention(teacher, n, h, w, ch, temperature)
        for i in range(h):
            for j in range(w):
                weight = fg[n, i, j].item()
                if weight == 0:
                    continue
                count += 1
                sq = [(student[n, c, i, j] - teacher[n, c, i, j]).item() ** 2 for c in range(ch)]
                feat += weight * sum(ch_t[c][i][j] * sq[c] for c in range(ch)) / ch
                att += sum(abs(ch_s[c][i][j] - ch_t[c][i][j]) for c in range(ch))
    return (gamma * feat + delta * att) / count


# --------------------------------------------------------------------------------------------
# cls_distill_loss
# --------------------------------------------------------------------------------------------


def test_cls_loss_fully_hand_computed() -> None:
    # One image, one channel (channel attention = 1), two locations, teacher features 0
    # (spatial attention 1 everywhere). fg = [0.5, 0] -> normalised by count 1; bg = [0, 1].
    student = torch.tensor([[[[1.0, 2.0]]]])
    teacher = torch.zeros(1, 1, 1, 2)
    fg = torch.tensor([[[0.5, 0.0]]])
    bg = torch.tensor([[[0.0, 1.0]]])
    loss = cls_distill_loss(
        student, teacher, fg, bg, temperature=1.0, alpha=0.3, beta=0.7, delta=0.1, level_weight=2.0
    )
    # L_fg = 0.5 * (1 - 0)^2; L_bg = 1 * (2 - 0)^2; student spatial attention = 2 * softmax([1, 2])
    # against the teacher's [1, 1]: sum |.| = 2 * tanh(1/2).
    expected = 2.0 * (0.3 * 0.5 + 0.7 * 4.0) + 0.1 * 2 * math.tanh(0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_cls_loss_matches_loop_reference_per_image() -> None:
    student, teacher, fg, bg = _features()
    loss = cls_distill_loss(student, teacher, fg, bg, **HYPER)
    ref = _reference_cls(student, teacher, fg, bg, **HYPER)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("group", [2, 4])
def test_cls_loss_official_broadcast_matches_loops(group: int) -> None:
    student, teacher, fg, bg = _features()
    loss = cls_distill_loss(student, teacher, fg, bg, **HYPER, mask_group=group)
    ref = _reference_cls(student, teacher, fg, bg, **HYPER, group=group)
    assert loss.item() == pytest.approx(ref, rel=1e-10)
    per_image = cls_distill_loss(student, teacher, fg, bg, **HYPER)
    assert loss.item() != pytest.approx(per_image.item(), rel=1e-3)


def test_cls_loss_official_broadcast_literal_formula() -> None:
    """mask_group = N reproduces the official (N,1,1,H,W) x (N,C,H,W) broadcast literally."""
    student, teacher, fg, bg = _features(n=2, ch=4, h=3, w=3, seed=5)
    t = 0.8
    n, ch, h, w = student.shape
    fg_hat = fg / (fg != 0).sum(dim=(1, 2), keepdim=True).clamp(min=1e-10)
    bg_hat = bg / (bg != 0).sum(dim=(1, 2), keepdim=True).clamp(min=1e-10)
    sp_t = h * w * torch.softmax(teacher.abs().mean(1).reshape(n, -1) / t, 1).reshape(n, h, w)
    ch_t = ch * torch.softmax(teacher.abs() / t, dim=1)
    fea_s = student * sp_t[:, None].sqrt() * ch_t.sqrt()
    fea_t = teacher * sp_t[:, None].sqrt() * ch_t.sqrt()
    m_fg = fg_hat[:, None, None]  # [N, 1, 1, H, W]
    m_bg = bg_hat[:, None, None]
    loss_fg = ((fea_s * m_fg.sqrt() - fea_t * m_fg.sqrt()) ** 2).sum() / n  # broadcast [N,N,C,H,W]
    loss_bg = ((fea_s * m_bg.sqrt() - fea_t * m_bg.sqrt()) ** 2).sum() / n
    ours = cls_distill_loss(
        student,
        teacher,
        fg,
        bg,
        temperature=t,
        alpha=1.0,
        beta=0.0,
        delta=0.0,
        level_weight=1.0,
        mask_group=2,
    )
    assert ours.item() == pytest.approx(loss_fg.item(), rel=1e-10)
    ours_bg = cls_distill_loss(
        student,
        teacher,
        fg,
        bg,
        temperature=t,
        alpha=0.0,
        beta=1.0,
        delta=0.0,
        level_weight=1.0,
        mask_group=2,
    )
    assert ours_bg.item() == pytest.approx(loss_bg.item(), rel=1e-10)


def test_cls_loss_group_of_one_is_per_image() -> None:
    student, teacher, fg, bg = _features()
    a = cls_distill_loss(student, teacher, fg, bg, **HYPER, mask_group=1)
    b = cls_distill_loss(student, teacher, fg, bg, **HYPER)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_cls_loss_normalises_by_count_not_sum() -> None:
    student, teacher, fg, bg = _features()
    kw = {"temperature": 0.8, "alpha": 1.0, "beta": 0.0, "delta": 0.0, "level_weight": 1.0}
    single = cls_distill_loss(student, teacher, fg, bg, **kw)
    double = cls_distill_loss(student, teacher, 2 * fg, bg, **kw)
    assert single.item() > 0
    assert double.item() == pytest.approx(2 * single.item(), rel=1e-12)


def test_cls_loss_level_weight_skips_attention_term() -> None:
    student, teacher, fg, bg = _features()
    kw = {"temperature": 0.8, "alpha": 0.0, "beta": 0.0, "delta": 1.0}
    a = cls_distill_loss(student, teacher, fg, bg, **kw, level_weight=1.0)
    b = cls_distill_loss(student, teacher, fg, bg, **kw, level_weight=2.0)
    assert a.item() > 0 and a.item() == pytest.approx(b.item(), rel=1e-12)


def test_cls_loss_zero_when_student_equals_teacher() -> None:
    _, teacher, fg, bg = _features()
    loss = cls_distill_loss(teacher.clone(), teacher, fg, bg, **HYPER, mask_group=2)
    assert loss.item() == 0.0


def test_cls_loss_gradient_only_to_student_and_through_attention() -> None:
    student, teacher, fg, bg = _features(seed=3)
    student = student.float().requires_grad_()
    teacher = teacher.float().requires_grad_()
    loss = cls_distill_loss(
        student,
        teacher,
        fg.float(),
        bg.float(),
        temperature=0.8,
        alpha=0.0,
        beta=0.0,
        delta=1.0,
        level_weight=1.0,
    )
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cls_loss_half_inputs_compute_in_fp32(dtype: torch.dtype) -> None:
    student, teacher, fg, bg = _features()
    loss = cls_distill_loss(student.to(dtype), teacher.to(dtype), fg, bg, **HYPER)
    ref = cls_distill_loss(student.to(dtype).double(), teacher.to(dtype).double(), fg, bg, **HYPER)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_cls_loss_bad_arguments() -> None:
    student, teacher, fg, bg = _features()
    with pytest.raises(ValueError, match=r"\[N, Ch, H, W\]"):
        cls_distill_loss(student[0], teacher[0], fg, bg, **HYPER)
    with pytest.raises(ValueError, match="student's shape"):
        cls_distill_loss(student, teacher[:, :2], fg, bg, **HYPER)
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        cls_distill_loss(student, teacher, fg[:, None], bg, **HYPER)
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        cls_distill_loss(student, teacher, fg, bg[:2], **HYPER)
    with pytest.raises(ValueError, match="divisor"):
        cls_distill_loss(student, teacher, fg, bg, **HYPER, mask_group=3)


# --------------------------------------------------------------------------------------------
# reg_distill_loss
# --------------------------------------------------------------------------------------------


def test_reg_loss_fully_hand_computed() -> None:
    # One channel (attention 1); two nonzero locations with raw weights 0.5 and 1 over 2 images.
    student = torch.tensor([[[[1.0, 5.0]]], [[[3.0, 0.0]]]])  # [2, 1, 1, 2]
    teacher = torch.zeros(2, 1, 1, 2)
    fg = torch.tensor([[[0.5, 0.0]], [[1.0, 0.0]]])
    loss = reg_distill_loss(student, teacher, fg, temperature=0.8, gamma=2.0, delta=0.1)
    # L_feat = (0.5 * 1 + 1 * 9) / 2 (raw weights, channel mean, / |P|); L_att = 0.
    assert loss.item() == pytest.approx(2.0 * 4.75, rel=1e-6)


def test_reg_loss_matches_loop_reference() -> None:
    student, teacher, fg, _ = _features(seed=7)
    loss = reg_distill_loss(student, teacher, fg, temperature=0.8, gamma=0.064, delta=0.0008)
    ref = _reference_reg(student, teacher, fg, temperature=0.8, gamma=0.064, delta=0.0008)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(ref, rel=1e-10)


def test_reg_loss_empty_mask_is_graph_connected_zero() -> None:
    student = torch.rand(2, 4, 3, 3, requires_grad=True)
    loss = reg_distill_loss(
        student, torch.rand(2, 4, 3, 3), torch.zeros(2, 3, 3), temperature=0.8, gamma=1, delta=1
    )
    assert loss.item() == 0.0 and loss.dim() == 0
    loss.backward()
    assert student.grad is not None and torch.equal(student.grad, torch.zeros_like(student))


def test_reg_loss_zero_when_equal_and_gradient_paths() -> None:
    student, teacher, fg, _ = _features(seed=9)
    assert reg_distill_loss(teacher.clone(), teacher, fg, temperature=0.8, gamma=1, delta=1) == 0
    student = student.float().requires_grad_()
    teacher = teacher.float().requires_grad_()
    loss = reg_distill_loss(student, teacher, fg.float(), temperature=0.8, gamma=0.0, delta=1.0)
    loss.backward()
    assert teacher.grad is None
    assert student.grad.abs().sum() > 0


def test_reg_loss_bf16_and_bad_shapes() -> None:
    student, teacher, fg, _ = _features(seed=4)
    loss = reg_distill_loss(
        student.bfloat16(), teacher.bfloat16(), fg, temperature=0.8, gamma=1.0, delta=1.0
    )
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        reg_distill_loss(student, teacher, fg[0], temperature=0.8, gamma=1.0, delta=1.0)
    with pytest.raises(ValueError, match=r"\[N, Ch, H, W\]"):
        reg_distill_loss(student[0], teacher, fg, temperature=0.8, gamma=1.0, delta=1.0)


def test_errors_name_the_argument_and_what_was_given() -> None:
    student, teacher, fg, bg = _features()
    cls = {"fg": fg, "bg": bg, **HYPER}
    message = r"^student must have shape \[N, Ch, H, W\], got \(2, 3\)$"
    with pytest.raises(ValueError, match=message):
        cls_distill_loss(student[0, 0], teacher, **cls)
    with pytest.raises(ValueError, match=r"^teacher must have shape .* got <class 'list'>$"):
        cls_distill_loss(student, [1.0], **cls)
    with pytest.raises(
        ValueError, match=r"^fg must have shape \[N, H, W\] = \(4, 2, 3\), got \(2,"
    ):
        cls_distill_loss(student, teacher, fg[:2], bg, **HYPER)
    with pytest.raises(ValueError, match=r"^bg must have shape .* got <class 'NoneType'>$"):
        cls_distill_loss(student, teacher, fg, None, **HYPER)
    with pytest.raises(
        ValueError, match=r"^fg must have shape \[N, H, W\] = \(4, 2, 3\), got \(2,"
    ):
        reg_distill_loss(student, teacher, fg[:2], temperature=0.8, gamma=1.0, delta=1.0)
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"^temperature must be > 0, got {temperature}$"):
            reg_distill_loss(student, teacher, fg, temperature=temperature, gamma=1.0, delta=1.0)


@pytest.mark.parametrize("wide", ["student", "teacher"])
def test_either_float64_input_makes_the_loss_float64(wide: str) -> None:
    student, teacher, fg, bg = _features()  # float64
    if wide == "student":
        teacher = teacher.float()
    else:
        student = student.float()
    assert cls_distill_loss(student, teacher, fg, bg, **HYPER).dtype == torch.float64
    reg = reg_distill_loss(student, teacher, fg, temperature=0.8, gamma=1.0, delta=1.0)
    assert reg.dtype == torch.float64
    empty = reg_distill_loss(student, teacher, fg * 0, temperature=0.8, gamma=1.0, delta=1.0)
    assert empty.dtype == torch.float64 and empty.item() == 0.0
