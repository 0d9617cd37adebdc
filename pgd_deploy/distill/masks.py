"""Prediction-guided masks: the teacher quality score, the PGW foreground mask, the background mask.

All three are pure functions of one image (pgd_method.md sections 0, 2.4-2.7), vectorised over
locations and ground truths, computed without gradient. Locations of all FPN levels are
concatenated (P3 first) into one axis A, so the top-K selection runs jointly over the levels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

EPS = 1e-10  # determinant clamp of the 2x2 inverse and margin of the strict inside test
IOU_EPS = 1e-6  # union clamp of the plain IoU (MMDetection BboxOverlaps2D)

__all__ = [
    "background_mask",
    "batch_masks",
    "pgw_mask",
    "pgw_masks",
    "quality_score",
    "quality_scores",
]


def _check(tensor: Tensor, name: str, shape: str, rank: int, last: int | None = None) -> None:
    """Raise ValueError naming the expected shape when `tensor` has the wrong rank or last dim."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(tensor)}")
    if tensor.dim() != rank or (last is not None and tensor.shape[-1] != last):
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")


def _empty_as(tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    """An image without GT may come as any empty tensor (e.g. `torch.zeros(0)`): reshape it."""
    return tensor.reshape(shape) if isinstance(tensor, Tensor) and tensor.numel() == 0 else tensor


def _float_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _box_iou(boxes: Tensor, gt_boxes: Tensor) -> Tensor:
    """Plain IoU of boxes [..., A, 4] against gt_boxes [..., G, 4] (xyxy) -> [..., A, G],
    union >= 1e-6. Leading (batch) dimensions broadcast."""
    lt = torch.maximum(boxes[..., :, None, :2], gt_boxes[..., None, :, :2])  # [..., A, G, 2]
    rb = torch.minimum(boxes[..., :, None, 2:], gt_boxes[..., None, :, 2:])  # [..., A, G, 2]
    inter = (rb - lt).clamp(min=0).prod(dim=-1)  # [..., A, G]
    area = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(dim=-1)  # [..., A]
    gt_area = (gt_boxes[..., 2:] - gt_boxes[..., :2]).clamp(min=0).prod(dim=-1)  # [..., G]
    union = (area[..., :, None] + gt_area[..., None, :] - inter).clamp(min=IOU_EPS)
    return inter / union


def _inside(points: Tensor, gt_boxes: Tensor, swap_xy: bool) -> Tensor:
    """Strict inside test of points [..., G, 2] or [A, 1, 2] against gt_boxes [G, 4] -> [..., G]
    (any shapes whose x/y and box coordinates broadcast, e.g. [B, K, G, 2] with [B, 1, G, 4]).

    `swap_xy` reads the point as (y, x), reproducing the official FCOS/AutoAssign test (P3).
    """
    x, y = points[..., 0], points[..., 1]
    if swap_xy:
        x, y = y, x
    x1, y1, x2, y2 = gt_boxes.unbind(dim=-1)  # [G] each
    return ((x - x1) > EPS) & ((y - y1) > EPS) & ((x2 - x) > EPS) & ((y2 - y) > EPS)


def _check_gt(gt_boxes: Tensor, gt_labels: Tensor, index: str = "") -> tuple[Tensor, Tensor]:
    """Validated (gt_boxes [G, 4], gt_labels [G] integer) of one image; `index` (e.g. "[2]")
    names the image of a batch in the messages."""
    gt_boxes, gt_labels = _empty_as(gt_boxes, (0, 4)), _empty_as(gt_labels, (0,))
    _check(gt_boxes, f"gt_boxes{index}", "[G, 4]", 2, 4)
    _check(gt_labels, f"gt_labels{index}", "[G]", 1)
    if gt_labels.shape[0] != gt_boxes.shape[0]:
        raise ValueError(
            f"gt_labels{index} must have shape [G] with G = {gt_boxes.shape[0]} (from "
            f"gt_boxes{index}), got {tuple(gt_labels.shape)}"
        )
    if gt_labels.numel() and (gt_labels.is_floating_point() or gt_labels.is_complex()):
        raise ValueError(
            f"gt_labels{index} must be integer class indices, got dtype {gt_labels.dtype}"
        )
    return gt_boxes, gt_labels


def _check_k_jitter(k: int, jitter: float) -> None:
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")


def _quality_terms(
    cls_logits: Tensor, pred_boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor
) -> tuple[Tensor, Tensor]:
    """Validated (sigmoid score of the GT class [A, G], IoU [A, G]) without gradient."""
    _check(cls_logits, "cls_logits", "[A, C]", 2)
    _check(pred_boxes, "pred_boxes", "[A, 4]", 2, 4)
    gt_boxes, gt_labels = _check_gt(gt_boxes, gt_labels)
    if pred_boxes.shape[0] != cls_logits.shape[0]:
        raise ValueError(
            f"pred_boxes must have shape [A, 4] with A = {cls_logits.shape[0]} (from cls_logits), "
            f"got {tuple(pred_boxes.shape)}"
        )
    num_classes = cls_logits.shape[1]
    if gt_labels.numel() and (int(gt_labels.min()) < 0 or int(gt_labels.max()) >= num_classes):
        raise ValueError(f"gt_labels must lie in [0, {num_classes}), got {gt_labels.tolist()}")
    dtype = _float_dtype(cls_logits, pred_boxes, gt_boxes)
    labels = gt_labels.to(device=cls_logits.device, dtype=torch.long)
    score = cls_logits.detach().to(dtype).index_select(1, labels).sigmoid()  # [A, G]
    iou = _box_iou(pred_boxes.detach().to(dtype), gt_boxes.detach().to(dtype))  # [A, G]
    return score, iou


@torch.no_grad()
def quality_score(
    cls_logits: Tensor, pred_boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, xi: float
) -> Tensor:
    """Teacher prediction quality of every location for every ground truth (section 2.4).

    q[a, g] = sigmoid(cls_logits[a, gt_labels[g]]) ** (1 - xi)
              * IoU(pred_boxes[a], gt_boxes[g]) ** xi

    Args:
        cls_logits: [A, C] raw teacher class logits, all levels concatenated.
        pred_boxes: [A, 4] teacher boxes, absolute xyxy pixels.
        gt_boxes: [G, 4] ground-truth boxes, absolute xyxy pixels.
        gt_labels: [G] 0-based class indices (integer).
        xi: IoU exponent (0.8 for the cls mask, 0.6 for the reg mask).

    Returns:
        [A, G] quality in [0, 1], float32 (float64 if an input is float64), no gradient.

    Raises:
        ValueError: wrong ranks, mismatched A or G, non-integer or out-of-range labels.
    """
    return quality_scores(cls_logits, pred_boxes, gt_boxes, gt_labels, (xi,))[0]


@torch.no_grad()
def quality_scores(
    cls_logits: Tensor,
    pred_boxes: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    xis: Sequence[float],
) -> list[Tensor]:
    """`quality_score` for several exponents, sharing the score gather and the IoU matrix.

    Returns:
        One [A, G] quality per entry of `xis`.
    """
    score, iou = _quality_terms(cls_logits, pred_boxes, gt_boxes, gt_labels)
    return [score.pow(1.0 - xi) * iou.pow(xi) for xi in xis]


def _gaussian_topk_weights(
    quality: Tensor, centers: Tensor, k: int, jitter: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Top-k locations per GT and their PGW Gaussian weights (section 2.6 a-d).

    Args:
        quality: [..., A, G] (leading batch dimensions allowed); centers: [A, 2] (x, y) px,
            same dtype as the result.
        k: locations per GT, 1 <= k <= A.

    Returns:
        index [..., K, G] (location of each selected point) and weight [..., K, G] in [0, 1].
    """
    index = quality.topk(k, dim=-2).indices  # [..., K, G]
    points = centers[index]  # [..., K, G, 2]
    fit = points
    if jitter:
        noise = torch.rand(
            points.shape, generator=generator, device=points.device, dtype=points.dtype
        )
        fit = points + (noise * 2.0 - 1.0) * jitter  # U(-jitter, jitter), for the fit only
    mean = fit.mean(dim=-3, keepdim=True)  # [..., 1, G, 2]
    diff = fit - mean  # [..., K, G, 2]
    var_x = diff[..., 0].square().mean(dim=-2, keepdim=True)  # [..., 1, G], biased (/ K)
    var_y = diff[..., 1].square().mean(dim=-2, keepdim=True)
    cov_xy = (diff[..., 0] * diff[..., 1]).mean(dim=-2, keepdim=True)
    det = var_x * var_y - cov_xy.square()  # [..., 1, G]
    offset = points - mean  # [..., K, G, 2], un-jittered points against the fitted mean
    dx, dy = offset[..., 0], offset[..., 1]
    # (p - mu)^T adj(Sigma) (p - mu) / (det + eps), adj = [[var_y, -cov], [-cov, var_x]].
    mahalanobis_sq = (dx.square() * var_y - 2.0 * dx * dy * cov_xy + dy.square() * var_x) / (
        det + EPS
    )
    # The true value is >= 0; the clamp only guards rounding on (near-)singular fits.
    weight = torch.exp(-0.5 * mahalanobis_sq.clamp(min=0))  # [..., K, G]
    return index, weight


@torch.no_grad()
def pgw_mask(
    quality: Tensor,
    centers: Tensor,
    gt_boxes: Tensor,
    k: int,
    jitter: float = 0.05,
    generator: torch.Generator | None = None,
    *,
    swap_xy: bool = False,
) -> Tensor:
    """Prediction-Guided Weighting foreground mask of one image (section 2.6).

    Per GT: the `k` locations of highest quality over all A (all levels jointly); a 2-D Gaussian
    fitted by maximum likelihood to their centres (plus uniform jitter in [-jitter, jitter] px,
    for the fit only; biased covariance; inverse = adjugate / (det + 1e-10)); weight
    exp(-0.5 * mahalanobis^2) at the k un-jittered centres, 0 elsewhere; times 1[centre strictly
    inside that GT]; then the max over GTs. The mask is sparse: at most k nonzeros per GT.

    Args:
        quality: [A, G] teacher quality (`quality_score`).
        centers: [A, 2] location centres (x, y) pixels, same order as `quality`.
        gt_boxes: [G, 4] ground-truth boxes, absolute xyxy pixels.
        k: locations per GT (clamped to A).
        jitter: half-width of the uniform noise in pixels; 0 makes the mask deterministic.
        generator: random generator for the jitter (on the device of `centers`); None = global.
        swap_xy: test the transposed point (y, x) for insideness, as the official FCOS code does
            (pitfall P3). Off by default (the correct test).

    Returns:
        [A] weights in [0, 1], float32 (float64 if an input is float64), no gradient.
        All zeros when G == 0.

    Raises:
        ValueError: wrong ranks or mismatched A or G, k < 1, jitter < 0.
    """
    return pgw_masks((quality,), centers, gt_boxes, k, jitter, generator, swap_xy=swap_xy)[0]


@torch.no_grad()
def pgw_masks(
    qualities: Sequence[Tensor],
    centers: Tensor,
    gt_boxes: Tensor,
    k: int,
    jitter: float = 0.05,
    generator: torch.Generator | None = None,
    *,
    swap_xy: bool = False,
) -> list[Tensor]:
    """`pgw_mask` of several qualities of the same GTs (e.g. the cls and reg masks) at once.

    One top-k and one batched Gaussian fit over all of them: the same masks as separate
    `pgw_mask` calls (identical with jitter = 0; other noise draws otherwise).

    Args:
        qualities: M tensors [A, G].
        centers, gt_boxes, k, jitter, generator, swap_xy: as in `pgw_mask`.

    Returns:
        M masks [A].
    """
    gt_boxes = _empty_as(gt_boxes, (0, 4))
    _check(centers, "centers", "[A, 2]", 2, 2)
    _check(gt_boxes, "gt_boxes", "[G, 4]", 2, 4)
    num_points, num_gt = centers.shape[0], gt_boxes.shape[0]
    for quality in qualities:
        _check(quality, "quality", "[A, G]", 2)
        if tuple(quality.shape) != (num_points, num_gt):
            raise ValueError(
                f"quality must have shape [A, G] = {(num_points, num_gt)} (A from centers, G "
                f"from gt_boxes), got {tuple(quality.shape)}"
            )
    _check_k_jitter(k, jitter)
    dtype = _float_dtype(centers, gt_boxes, *qualities)
    masks = [torch.zeros(num_points, dtype=dtype, device=centers.device) for _ in qualities]
    if num_gt == 0 or num_points == 0 or not masks:
        return masks
    centers = centers.detach().to(dtype)
    gt_boxes = gt_boxes.detach().to(dtype)
    joint = torch.cat([q.detach().to(dtype) for q in qualities], dim=1)  # [A, M*G]
    index, weight = _gaussian_topk_weights(
        joint, centers, min(int(k), num_points), jitter, generator
    )  # [K, M*G] each
    # In-box filter after the fit (P5), tested only at the selected points: an unselected
    # location has weight 0 whatever its insideness.
    boxes = gt_boxes.repeat(len(qualities), 1)  # [M*G, 4]
    weight = weight * _inside(centers[index], boxes, swap_xy).to(dtype)  # [K, M*G]
    # Max over GTs: scatter the K*G candidate weights (all >= 0) onto their locations.
    for m, mask in enumerate(masks):
        cols = slice(m * num_gt, (m + 1) * num_gt)
        mask.scatter_reduce_(
            0, index[:, cols].reshape(-1), weight[:, cols].reshape(-1), reduce="amax"
        )
    return masks


@torch.no_grad()
def background_mask(centers: Tensor, gt_boxes: Tensor, *, swap_xy: bool = False) -> Tensor:
    """Background mask of one image (section 2.7): 1 where the centre is strictly inside no GT.

    Args:
        centers: [A, 2] location centres (x, y) pixels.
        gt_boxes: [G, 4] ground-truth boxes, absolute xyxy pixels.
        swap_xy: test the transposed point (y, x), as the official FCOS code does (P3).

    Returns:
        [A] of 0.0 / 1.0, float32 (float64 if an input is float64); all ones when G == 0.

    Raises:
        ValueError: wrong ranks.
    """
    gt_boxes = _empty_as(gt_boxes, (0, 4))
    _check(centers, "centers", "[A, 2]", 2, 2)
    _check(gt_boxes, "gt_boxes", "[G, 4]", 2, 4)
    dtype = _float_dtype(centers, gt_boxes)
    centers = centers.detach().to(dtype)
    if gt_boxes.shape[0] == 0:
        return torch.ones(centers.shape[0], dtype=dtype, device=centers.device)
    inside = _inside(centers[:, None, :], gt_boxes.detach().to(dtype), swap_xy)  # [A, G]
    return (~inside.any(dim=1)).to(dtype)


def _pad(tensors: Sequence[Tensor], shape: tuple[int, ...], **like) -> Tensor:
    """Stack per-image [G_b, ...] tensors into [B, G_max, ...], zero padded."""
    items = [t.reshape(-1, *shape).to(**like) for t in tensors]
    return torch.nn.utils.rnn.pad_sequence(items, batch_first=True)


@torch.no_grad()
def batch_masks(
    cls_logits: Tensor,
    pred_boxes: Tensor,
    centers: Tensor,
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    xis: Sequence[float],
    k: int,
    jitter: float = 0.05,
    generator: torch.Generator | None = None,
    *,
    swap_xy: bool = False,
) -> tuple[list[Tensor], Tensor]:
    """PGW masks (one per exponent in `xis`) and background masks of a whole batch at once.

    The same values as `quality_scores` + `pgw_masks` + `background_mask` image by image
    (identical with jitter = 0; other noise draws otherwise), computed with the GTs padded to the
    batch's largest count, so that the work is a fixed number of batched operations instead of
    a Python loop over images: on a GPU the per-image loop costs more in kernel launches and host
    synchronisations than in arithmetic.

    Args:
        cls_logits: [B, A, C] raw teacher class logits, all levels concatenated.
        pred_boxes: [B, A, 4] teacher boxes, absolute xyxy pixels.
        centers: [A, 2] location centres (x, y) pixels, the same for every image.
        gt_boxes: B tensors [G_b, 4] (G_b may be 0), absolute xyxy pixels.
        gt_labels: B tensors [G_b] of 0-based class indices.
        xis: IoU exponents, e.g. (0.8, 0.6) for the cls and reg masks.
        k, jitter, generator, swap_xy: as in `pgw_mask`.

    Returns:
        (M masks [B, A], background mask [B, A]), float32 (float64 if an input is float64).

    Raises:
        ValueError: wrong ranks or mismatched sizes, non-integer or out-of-range labels, k < 1,
            jitter < 0.
    """
    _check(cls_logits, "cls_logits", "[B, A, C]", 3)
    _check(pred_boxes, "pred_boxes", "[B, A, 4]", 3, 4)
    _check(centers, "centers", "[A, 2]", 2, 2)
    batch, num_points, num_classes = cls_logits.shape
    if pred_boxes.shape[:2] != cls_logits.shape[:2] or centers.shape[0] != num_points:
        raise ValueError(
            f"pred_boxes [B, A, 4] and centers [A, 2] must match cls_logits [B, A, C] = "
            f"{tuple(cls_logits.shape)}, got {tuple(pred_boxes.shape)} and {tuple(centers.shape)}"
        )
    if len(gt_boxes) != batch or len(gt_labels) != batch:
        raise ValueError(
            f"need one gt_boxes and one gt_labels tensor per image (B = {batch}), got "
            f"{len(gt_boxes)} and {len(gt_labels)}"
        )
    counts = [
        _check_gt(boxes, labels, f"[{i}]")[0].shape[0]
        for i, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels, strict=True))
    ]
    _check_k_jitter(k, jitter)
    dtype = _float_dtype(cls_logits, pred_boxes, centers, *gt_boxes)
    device = centers.device
    masks = [torch.zeros(batch, num_points, dtype=dtype, device=device) for _ in xis]
    background = torch.ones(batch, num_points, dtype=dtype, device=device)
    num_gt = max(counts, default=0)
    if num_gt == 0 or num_points == 0 or not masks:
        return masks, background

    labels = _pad(gt_labels, (), device=device, dtype=torch.long)  # [B, G]
    # One host synchronisation for the whole batch (not two per image).
    low, high = torch.stack(torch.aminmax(torch.cat([t.reshape(-1) for t in gt_labels]))).tolist()
    if low < 0 or high >= num_classes:
        raise ValueError(f"gt_labels must lie in [0, {num_classes}), got values in [{low}, {high}]")
    boxes = _pad(gt_boxes, (4,), device=device, dtype=dtype)  # [B, G, 4], zero boxes padded
    valid = torch.arange(num_gt, device=device) < torch.tensor(counts, device=device)[:, None]
    centers = centers.detach().to(dtype)

    # Quality (section 2.4) of every location for every GT: [B, A, G].
    index = labels[:, None, :].expand(batch, num_points, num_gt)
    score = cls_logits.detach().to(dtype).gather(2, index).sigmoid()
    iou = _box_iou(pred_boxes.detach().to(dtype), boxes)
    joint = torch.cat([score.pow(1.0 - xi) * iou.pow(xi) for xi in xis], dim=2)  # [B, A, M*G]

    topk, weight = _gaussian_topk_weights(
        joint, centers, min(int(k), num_points), jitter, generator
    )  # [B, K, M*G] each
    joint_boxes = boxes.repeat(1, len(xis), 1)  # [B, M*G, 4]
    keep = (
        _inside(centers[topk], joint_boxes[:, None], swap_xy) & valid.repeat(1, len(xis))[:, None]
    )  # in-box filter after the fit (P5); padded GTs never count
    weight = weight * keep.to(dtype)
    for m, mask in enumerate(masks):
        cols = slice(m * num_gt, (m + 1) * num_gt)
        mask.scatter_reduce_(
            1,
            topk[..., cols].reshape(batch, -1),
            weight[..., cols].reshape(batch, -1),
            reduce="amax",
        )
    inside = _inside(centers[None, :, None, :], boxes[:, None], swap_xy) & valid[:, None, :]
    background = (~inside.any(dim=2)).to(dtype)  # [B, A]
    return masks, background
