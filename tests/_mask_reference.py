"""A plain-loop reference of the PGD masks of docs/method.md §3 (`reference_masks`) and its
pieces (`sigmoid`, `gaussian_weights`), in numpy float64: what the mask tests
(test_distill_masks*.py) check the batched and per-image code of pgd_deploy.distill.masks
against."""

from __future__ import annotations

import math

import numpy as np


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def gaussian_weights(points: np.ndarray) -> np.ndarray:
    """Reference PGW weights of K points [K, 2] (no jitter): numpy MLE fit + matrix inverse."""
    mean = points.mean(axis=0)
    cov = np.cov(points.T, bias=True)
    inv = np.linalg.inv(cov)
    diff = points - mean
    return np.exp(-0.5 * np.einsum("ki,ij,kj->k", diff, inv, diff))


def _iou(box: np.ndarray, gt: np.ndarray) -> float:
    width = max(0.0, min(box[2], gt[2]) - max(box[0], gt[0]))
    height = max(0.0, min(box[3], gt[3]) - max(box[1], gt[1]))
    area = max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])
    gt_area = max(0.0, gt[2] - gt[0]) * max(0.0, gt[3] - gt[1])
    return width * height / (area + gt_area - width * height)


def _strictly_inside(point: np.ndarray, gt: np.ndarray, swap_xy: bool) -> bool:
    x, y = (point[1], point[0]) if swap_xy else (point[0], point[1])
    return bool(gt[0] < x < gt[2] and gt[1] < y < gt[3])


def reference_masks(logits, pred, centers, gts, labels, xis, k, swap_xy=False):
    """The masks of docs/method.md §3 written as a plain loop, image by image, GT by GT, location
    by location, in numpy float64 (no jitter): the reference the batched code is checked
    against. Returns (masks [M, B, A], background [B, A])."""
    logits, pred, centers = (t.double().numpy() for t in (logits, pred, centers))
    batch, num_points, _ = logits.shape
    masks, background = np.zeros((len(xis), batch, num_points)), np.ones((batch, num_points))
    for b in range(batch):
        for gt, label in zip(gts[b].double().numpy(), labels[b].tolist(), strict=True):
            inside = [_strictly_inside(centers[a], gt, swap_xy) for a in range(num_points)]
            background[b, inside] = 0.0
            for m, xi in enumerate(xis):
                quality = np.array(
                    [
                        sigmoid(logits[b, a, label]) ** (1 - xi) * _iou(pred[b, a], gt) ** xi
                        for a in range(num_points)
                    ]
                )
                order = np.argsort(-quality, kind="stable")
                top = order[: min(k, num_points)]
                if len(order) > len(top):  # a tie at the cut would make the top-k ambiguous
                    assert quality[top[-1]] > quality[order[len(top)]]
                for a, weight in zip(top, gaussian_weights(centers[top]), strict=True):
                    if inside[a]:
                        masks[m, b, a] = max(masks[m, b, a], weight)
    return masks, background
