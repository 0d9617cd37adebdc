"""Tests of pgd_deploy.serve.draw: class colours, labels, the highlight style and resizing."""

from __future__ import annotations

import numpy as np
import pytest

from pgd_deploy.serve.draw import (
    HIGHLIGHT,
    PALETTE,
    _rgb,
    class_colour,
    draw_detections,
    fit_for_display,
)
from pgd_deploy.structures import Detections


def _dets(boxes, scores=None, labels=None) -> Detections:
    n = len(boxes)
    return Detections(
        np.asarray(boxes, np.float32),
        np.asarray(scores if scores is not None else [0.9] * n, np.float32),
        np.asarray(labels if labels is not None else [0] * n, np.int64),
    )


def _has_colour(image: np.ndarray, colour: str, region=(slice(None), slice(None))) -> bool:
    return bool(np.all(image[region] == _rgb(colour), axis=-1).any())


def test_boxes_in_class_colours_with_labels() -> None:
    image = np.zeros((200, 300, 3), np.uint8)
    dets = _dets([[50, 60, 150, 160], [200, 100, 280, 190]], [0.9, 0.5], [0, 2])
    out = np.asarray(draw_detections(image, dets, ["circle", "square", "triangle"]))
    assert out.shape == (200, 300, 3)
    assert _has_colour(out, class_colour(0), (slice(100, 150), slice(48, 53)))  # left edge
    assert _has_colour(out, class_colour(2), (slice(150, 190), slice(278, 283)))
    assert _has_colour(out, class_colour(0), (slice(30, 60), slice(50, 150)))  # label background
    assert not _has_colour(out, HIGHLIGHT)
    assert np.all(image == 0), "the input is not modified"


def test_highlighted_boxes_use_the_highlight_style() -> None:
    image = np.full((120, 120, 3), 255, np.uint8)
    dets = _dets([[10, 30, 50, 70], [60, 30, 110, 90]], labels=[1, 1])
    out = np.asarray(draw_detections(image, dets, ["a", "b"], highlight=np.array([False, True])))
    assert _has_colour(out, class_colour(1), (slice(40, 70), slice(8, 13)))
    assert _has_colour(out, HIGHLIGHT, (slice(40, 90), slice(57, 64)))
    assert not _has_colour(out, HIGHLIGHT, (slice(40, 70), slice(0, 40)))
    edge = np.all(out[35:90, 58:63] == _rgb(HIGHLIGHT), axis=-1).any(axis=1)
    assert 0.2 < edge.mean() < 0.9, "dashed, not solid"


def test_small_images_are_enlarged_with_their_boxes() -> None:
    image = np.zeros((128, 96, 3), np.uint8)
    dets = _dets([[10, 20, 40, 60]])
    out = np.asarray(draw_detections(image, dets, ["x"], min_side=384))  # 4x
    assert out.shape == (512, 384, 3)
    assert _has_colour(out, class_colour(0), (slice(120, 220), slice(36, 44)))  # x = 40
    half = np.asarray(draw_detections(image[::2, ::2], dets, ["x"], box_scale=0.5))
    assert _has_colour(half, class_colour(0), (slice(20, 30), slice(3, 8)))  # x = 10 / 2


def test_unknown_labels_empty_detections_and_errors() -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    out = draw_detections(image, _dets([[5, 20, 40, 50]], labels=[7]), ["only"])
    assert _has_colour(np.asarray(out), PALETTE[7])
    empty = draw_detections(image, Detections.empty(), ["x"])
    assert np.array_equal(np.asarray(empty), image)
    with pytest.raises(ValueError, match="highlight has 2 entries for 1 detections"):
        draw_detections(image, _dets([[0, 0, 5, 5]]), ["x"], highlight=np.array([True, False]))


def test_fit_for_display_bounds() -> None:
    small, scale = fit_for_display(np.zeros((100, 200, 3), np.uint8), min_side=400)
    assert small.size == (800, 400) and scale == 4.0
    big, scale = fit_for_display(np.zeros((3000, 1000, 3), np.uint8), max_side=1500)
    assert big.size == (500, 1500) and scale == 0.5
    same, scale = fit_for_display(np.zeros((50, 60, 3), np.uint8))
    assert same.size == (60, 50) and scale == 1.0
