"""The batched tensor operations behind every PGD mask: quality, PGW weights, background.

Each mask value of `pgd_deploy.distill.masks` is computed here, for B images at once: the GTs
of the images are padded to the batch's largest count G with zero boxes, so that a batch is a
fixed number of batched operations instead of a Python loop over images (on a GPU
the loop costs more in kernel launches and host synchronisations than in arithmetic). Inputs
arrive validated and in the result dtype; no gradient is tracked by the callers. The per-image
functions of the public contract call these with B = 1.

A padded GT is the zero-area box (0, 0, 0, 0): no centre is strictly inside it, so it never puts
a weight into a PGW mask nor takes a location out of the background.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

EPS = 1e-10  # determinant clamp of the 2x2 inverse and margin of the strict inside test
IOU_EPS = 1e-6  # union clamp of the plain IoU (MMDetection BboxOverlaps2D)

__all__ = ["background", "box_iou", "gaussian_topk_weights", "pgw", "quality", "strictly_inside"]


def box_iou(boxes: Tensor, gt_boxes: Tensor) -> Tensor:
    """Plain IoU of boxes [..., A, 4] against gt_boxes [..., G, 4] (xyxy) -> [..., A, G],
    union >= 1e-6. Leading (batch) dimensions broadcast."""
    lt = torch.maximum(boxes[..., :, None, :2], gt_boxes[..., None, :, :2])  # [..., A, G, 2]
    rb = torch.minimum(boxes[..., :, None, 2:], gt_boxes[..., None, :, 2:])  # [..., A, G, 2]
    inter = (rb - lt).clamp(min=0).prod(dim=-1)  # [..., A, G]
    area = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(dim=-1)  # [..., A]
    gt_area = (gt_boxes[..., 2:] - gt_boxes[..., :2]).clamp(min=0).prod(dim=-1)  # [..., G]
    union = (area[..., :, None] + gt_area[..., None, :] - inter).clamp(min=IOU_EPS)
    return inter / union


def strictly_inside(points: Tensor, gt_boxes: Tensor, swap_xy: bool) -> Tensor:
    """Strict inside test of points [..., G, 2] or [A, 1, 2] against gt_boxes [G, 4] -> [..., G]
    (any shapes whose x/y and box coordinates broadcast, e.g. [B, K, G, 2] with [B, 1, G, 4]).

    `swap_xy` reads the point as (y, x), reproducing the official FCOS/AutoAssign test
    (docs/method.md D3).
    """
    x, y = points[..., 0], points[..., 1]
    if swap_xy:
        x, y = y, x
    x1, y1, x2, y2 = gt_boxes.unbind(dim=-1)  # [G] each
    return ((x - x1) > EPS) & ((y - y1) > EPS) & ((x2 - x) > EPS) & ((y2 - y) > EPS)


def quality(
    cls_logits: Tensor, pred_boxes: Tensor, labels: Tensor, boxes: Tensor, xis: Sequence[float]
) -> Tensor:
    """Teacher quality (docs/method.md §3) of every location for every GT, for each exponent.

    Args:
        cls_logits: [B, A, C]; pred_boxes: [B, A, 4]; labels: [B, G] long; boxes: [B, G, 4].
        xis: M IoU exponents.

    Returns:
        [B, A, M*G] in the dtype of `boxes`: columns m*G..(m+1)*G-1 hold exponent xis[m].
    """
    batch, num_points, _ = cls_logits.shape
    index = labels[:, None, :].expand(batch, num_points, labels.shape[1])  # [B, A, G]
    score = cls_logits.detach().to(boxes.dtype).gather(2, index).sigmoid()  # [B, A, G]
    iou = box_iou(pred_boxes.detach().to(boxes.dtype), boxes)  # [B, A, G]
    return torch.cat([score.pow(1.0 - xi) * iou.pow(xi) for xi in xis], dim=2)


def gaussian_topk_weights(
    quality: Tensor, centers: Tensor, k: int, jitter: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Top-k locations per GT and their PGW Gaussian weights (docs/method.md §3).

    Args:
        quality: [B, A, G'] (G' columns, one per GT and exponent); centers: [A, 2] (x, y) px,
            same dtype as the result.
        k: locations per GT, 1 <= k <= A.

    Returns:
        index [B, K, G'] (location of each selected point) and weight [B, K, G'] in [0, 1].
        The jitter is one uniform draw of shape [B, K, G', 2] (points in top-k order), so a
        batch of one draws exactly what the per-image [K, G, 2] draw did.
    """
    index = quality.topk(k, dim=-2).indices  # [B, K, G']
    points = centers[index]  # [B, K, G', 2]
    fit = points
    if jitter:
        noise = torch.rand(
            points.shape, generator=generator, device=points.device, dtype=points.dtype
        )
        fit = points + (noise * 2.0 - 1.0) * jitter  # U(-jitter, jitter), for the fit only
    mean = fit.mean(dim=-3, keepdim=True)  # [B, 1, G', 2]
    diff = fit - mean  # [B, K, G', 2]
    var_x = diff[..., 0].square().mean(dim=-2, keepdim=True)  # [B, 1, G'], biased (/ K)
    var_y = diff[..., 1].square().mean(dim=-2, keepdim=True)
    cov_xy = (diff[..., 0] * diff[..., 1]).mean(dim=-2, keepdim=True)
    det = var_x * var_y - cov_xy.square()  # [B, 1, G']
    offset = points - mean  # [B, K, G', 2], un-jittered points against the fitted mean
    dx, dy = offset[..., 0], offset[..., 1]
    # (p - mu)^T adj(Sigma) (p - mu) / (det + eps), adj = [[var_y, -cov], [-cov, var_x]].
    mahalanobis_sq = (dx.square() * var_y - 2.0 * dx * dy * cov_xy + dy.square() * var_x) / (
        det + EPS
    )
    # The true value is >= 0; the clamp only guards rounding on (near-)singular fits.
    weight = torch.exp(-0.5 * mahalanobis_sq.clamp(min=0))  # [B, K, G']
    return index, weight


def pgw(
    quality: Tensor,
    centers: Tensor,
    boxes: Tensor,
    k: int,
    jitter: float,
    generator: torch.Generator | None,
    swap_xy: bool,
) -> list[Tensor]:
    """PGW masks (docs/method.md §3) of M qualities of the same GTs: one top-k, one batched fit.

    Args:
        quality: [B, A, M*G] (`quality`); centers: [A, 2]; boxes: [B, G, 4], G >= 1.
        k, jitter, generator, swap_xy: as in `pgw_mask`.

    Returns:
        M masks [B, A]: per GT, the Gaussian weight at its top-k locations that lie strictly
        inside it (0 elsewhere), then the max over the GTs.
    """
    batch, num_points, columns = quality.shape
    num_gt = boxes.shape[1]
    num_masks = columns // num_gt
    index, weight = gaussian_topk_weights(
        quality, centers, min(int(k), num_points), jitter, generator
    )  # [B, K, M*G] each
    # In-box filter after the fit (docs/method.md D5), tested only at the selected points: an
    # unselected location has weight 0 whatever its insideness (a padded GT has no point inside).
    joint_boxes = boxes.repeat(1, num_masks, 1)  # [B, M*G, 4]
    keep = strictly_inside(centers[index], joint_boxes[:, None], swap_xy)  # [B, K, M*G]
    weight = weight * keep.to(weight.dtype)
    masks = []
    for m in range(num_masks):
        # Max over GTs: scatter the K*G candidate weights (all >= 0) onto their locations.
        cols = slice(m * num_gt, (m + 1) * num_gt)
        mask = torch.zeros(batch, num_points, dtype=weight.dtype, device=centers.device)
        mask.scatter_reduce_(
            1,
            index[..., cols].reshape(batch, -1),
            weight[..., cols].reshape(batch, -1),
            reduce="amax",
        )
        masks.append(mask)
    return masks


def background(centers: Tensor, boxes: Tensor, swap_xy: bool) -> Tensor:
    """Background masks (docs/method.md §3): centers [A, 2], boxes [B, G, 4] -> [B, A], 1 where the
    centre is strictly inside no GT, in the dtype of `boxes`."""
    inside = strictly_inside(centers[None, :, None, :], boxes[:, None], swap_xy)  # [B, A, G]
    return (~inside.any(dim=2)).to(boxes.dtype)
