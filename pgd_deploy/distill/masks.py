"""Prediction-guided masks: the teacher quality score, the PGW foreground mask, the background mask.

Pure functions (docs/method.md §3), vectorised over locations and ground truths,
computed without gradient. Locations of all FPN levels are concatenated (P3 first) into one axis
A, so the top-K selection runs jointly over the levels.

Every mask value is computed once, by the batched operations of `mask_ops`. `batch_masks`, what
the distiller calls, runs them on a whole batch; the per-image functions of the public contract
(`quality_score`, `pgw_mask`, `background_mask`) check their arguments as documented and run
them on a batch of one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pgd_deploy.distill import mask_ops
from pgd_deploy.distill.losses import float_dtype

__all__ = ["background_mask", "batch_masks", "gt_box_masks", "pgw_mask", "quality_score"]


def _check(tensor: Tensor, name: str, shape: str, rank: int, last: int | None = None) -> None:
    """Raise ValueError naming the expected shape when `tensor` has the wrong rank or last dim."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(tensor)}")
    if tensor.dim() != rank or (last is not None and tensor.shape[-1] != last):
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")


def _empty_as(tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    """An image without GT may come as any empty tensor (e.g. `torch.zeros(0)`): reshape it."""
    return tensor.reshape(shape) if isinstance(tensor, Tensor) and tensor.numel() == 0 else tensor


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


def _check_quality_args(
    cls_logits: Tensor, pred_boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor
) -> tuple[Tensor, Tensor]:
    """`quality_score`'s checks; returns the validated (gt_boxes [G, 4], gt_labels [G])."""
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
    return gt_boxes, gt_labels


def _check_pgw_args(quality: Tensor, centers: Tensor, gt_boxes: Tensor, k: int, jitter: float):
    """`pgw_mask`'s checks; returns the validated gt_boxes [G, 4]."""
    gt_boxes = _empty_as(gt_boxes, (0, 4))
    _check(centers, "centers", "[A, 2]", 2, 2)
    _check(gt_boxes, "gt_boxes", "[G, 4]", 2, 4)
    _check(quality, "quality", "[A, G]", 2)
    num_points, num_gt = centers.shape[0], gt_boxes.shape[0]
    if tuple(quality.shape) != (num_points, num_gt):
        raise ValueError(
            f"quality must have shape [A, G] = {(num_points, num_gt)} (A from centers, G "
            f"from gt_boxes), got {tuple(quality.shape)}"
        )
    _check_k_jitter(k, jitter)
    return gt_boxes


# --------------------------------------------------------------------------------------------
# The public per-image contract (docs/method.md §3): checks, then a batch of one
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def quality_score(
    cls_logits: Tensor, pred_boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, xi: float
) -> Tensor:
    """Teacher prediction quality of every location for every ground truth (docs/method.md §3).

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
    gt_boxes, gt_labels = _check_quality_args(cls_logits, pred_boxes, gt_boxes, gt_labels)
    dtype = float_dtype(cls_logits, pred_boxes, gt_boxes)
    labels = gt_labels.to(device=cls_logits.device, dtype=torch.long)
    boxes = gt_boxes.detach().to(dtype)
    return mask_ops.quality(cls_logits[None], pred_boxes[None], labels[None], boxes[None], (xi,))[0]


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
    """Prediction-Guided Weighting foreground mask of one image (docs/method.md §3).

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
            The noise is one draw of shape [K, G, 2], the points of each GT in top-k order.
        swap_xy: test the transposed point (y, x) for insideness, as the official FCOS code does
            (docs/method.md D3). Off by default (the correct test).

    Returns:
        [A] weights in [0, 1], float32 (float64 if an input is float64), no gradient.
        All zeros when G == 0.

    Raises:
        ValueError: wrong ranks or mismatched A or G, k < 1, jitter < 0.
    """
    gt_boxes = _check_pgw_args(quality, centers, gt_boxes, k, jitter)
    dtype = float_dtype(centers, gt_boxes, quality)
    num_points, num_gt = quality.shape
    if num_gt == 0 or num_points == 0:
        return torch.zeros(num_points, dtype=dtype, device=centers.device)
    boxes = gt_boxes.detach().to(dtype)[None]  # [1, G, 4]
    centers = centers.detach().to(dtype)
    quality = quality.detach().to(dtype)[None]  # [1, A, G]
    return mask_ops.pgw(quality, centers, boxes, k, jitter, generator, swap_xy)[0][0]


@torch.no_grad()
def background_mask(centers: Tensor, gt_boxes: Tensor, *, swap_xy: bool = False) -> Tensor:
    """Background mask of one image (docs/method.md §3): 1 where the centre is strictly inside
    no GT.

    Args:
        centers: [A, 2] location centres (x, y) pixels.
        gt_boxes: [G, 4] ground-truth boxes, absolute xyxy pixels.
        swap_xy: test the transposed point (y, x), as the official FCOS code does
            (docs/method.md D3).

    Returns:
        [A] of 0.0 / 1.0, float32 (float64 if an input is float64); all ones when G == 0.

    Raises:
        ValueError: wrong ranks.
    """
    gt_boxes = _empty_as(gt_boxes, (0, 4))
    _check(centers, "centers", "[A, 2]", 2, 2)
    _check(gt_boxes, "gt_boxes", "[G, 4]", 2, 4)
    dtype = float_dtype(centers, gt_boxes)
    boxes = gt_boxes.detach().to(dtype)[None]  # [1, G, 4]
    return mask_ops.background(centers.detach().to(dtype), boxes, swap_xy)[0]


# --------------------------------------------------------------------------------------------
# The batch (what the distiller calls)
# --------------------------------------------------------------------------------------------


def _check_batch(
    cls_logits: Tensor,
    pred_boxes: Tensor,
    centers: Tensor,
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    k: int,
    jitter: float,
) -> list[int]:
    """`batch_masks`' checks; returns the GT count of each image."""
    _check(cls_logits, "cls_logits", "[B, A, C]", 3)
    _check(pred_boxes, "pred_boxes", "[B, A, 4]", 3, 4)
    _check(centers, "centers", "[A, 2]", 2, 2)
    batch, num_points, _ = cls_logits.shape
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
    return counts


def _pad(tensors: Sequence[Tensor], shape: tuple[int, ...], **like) -> Tensor:
    """Stack per-image [G_b, ...] tensors into [B, G_max, ...], zero padded."""
    items = [t.reshape(-1, *shape).to(**like) for t in tensors]
    return torch.nn.utils.rnn.pad_sequence(items, batch_first=True)


def _pad_targets(
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    num_classes: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """(labels [B, G] long, boxes [B, G, 4]) padded to the largest count G with label 0 and the
    zero-area box (0, 0, 0, 0), which never counts (see `mask_ops`).

    Raises:
        ValueError: a label outside [0, num_classes).
    """
    labels = _pad(gt_labels, (), device=device, dtype=torch.long)  # [B, G]
    # One host synchronisation for the whole batch (not two per image).
    low, high = torch.stack(torch.aminmax(torch.cat([t.reshape(-1) for t in gt_labels]))).tolist()
    if low < 0 or high >= num_classes:
        raise ValueError(f"gt_labels must lie in [0, {num_classes}), got values in [{low}, {high}]")
    boxes = _pad(gt_boxes, (4,), device=device, dtype=dtype)  # [B, G, 4]
    return labels, boxes


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

    Image b gets the masks `quality_score` + `pgw_mask` + `background_mask` give it on its own
    (identical with jitter = 0; with jitter, one noise draw serves the whole batch and all
    exponents, so the draws differ from separate calls).

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
    counts = _check_batch(cls_logits, pred_boxes, centers, gt_boxes, gt_labels, k, jitter)
    batch, num_points, num_classes = cls_logits.shape
    dtype = float_dtype(cls_logits, pred_boxes, centers, *gt_boxes)
    device = centers.device
    if max(counts, default=0) == 0 or num_points == 0 or not xis:
        masks = [torch.zeros(batch, num_points, dtype=dtype, device=device) for _ in xis]
        return masks, torch.ones(batch, num_points, dtype=dtype, device=device)
    labels, boxes = _pad_targets(gt_boxes, gt_labels, num_classes, dtype=dtype, device=device)
    centers = centers.detach().to(dtype)
    quality = mask_ops.quality(cls_logits, pred_boxes, labels, boxes, xis)  # [B, A, M*G]
    masks = mask_ops.pgw(quality, centers, boxes, k, jitter, generator, swap_xy)
    return masks, mask_ops.background(centers, boxes, swap_xy)


@torch.no_grad()
def gt_box_masks(
    centers: Tensor, gt_boxes: Sequence[Tensor], *, swap_xy: bool = False
) -> tuple[Tensor, Tensor]:
    """Ground-truth-box masks of a batch: the FGD-style alternative to the PGW masks.

    The foreground is every location whose centre lies strictly inside some GT box (weight 1,
    binary: FGD's area-normalised scale mask is not used, the loss normalises by the count of
    nonzero locations anyway); the background is its complement, exactly `background_mask`.
    No teacher prediction enters, which is the point of the ablation (`distill.masks`).

    Args:
        centers: [A, 2] location centres (x, y) pixels.
        gt_boxes: B tensors [G_b, 4] (G_b may be 0), absolute xyxy pixels.
        swap_xy: as in `background_mask`.

    Returns:
        (foreground [B, A], background [B, A]) of 0.0 and 1.0, summing to 1 everywhere.

    Raises:
        ValueError: wrong ranks.
    """
    _check(centers, "centers", "[A, 2]", 2, 2)
    boxes = [_empty_as(b, (0, 4)) for b in gt_boxes]
    for i, b in enumerate(boxes):
        _check(b, f"gt_boxes[{i}]", "[G, 4]", 2, 4)
    dtype = float_dtype(centers, *boxes)
    if max((b.shape[0] for b in boxes), default=0) == 0:
        bg = torch.ones(len(boxes), centers.shape[0], dtype=dtype, device=centers.device)
    else:  # padding boxes (0, 0, 0, 0) contain no centre
        padded = _pad(boxes, (4,), device=centers.device, dtype=dtype)  # [B, G, 4]
        bg = mask_ops.background(centers.detach().to(dtype), padded, swap_xy)
    return 1.0 - bg, bg
