"""Draw detections on images with PIL: one colour per class, a label with the score, and a
highlight style (thick dashed magenta) for boxes that the other model did not find.

Used by `pgd-serve predict --save-images` and by the web demo; numpy and PIL only.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pgd_deploy.structures import Detections

# Tableau-like palette, without magenta (reserved for highlights).
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#9edae5",
    "#dbdb8d",
    "#393b79",
    "#637939",
    "#8c6d31",
)
HIGHLIGHT = "#ff00c8"  # boxes found by one model only


def class_colour(label: int) -> str:
    """Hex colour of a contiguous class index."""
    return PALETTE[int(label) % len(PALETTE)]


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def _text_colour(bg: str) -> str:
    r, g, b = _rgb(bg)
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "#ffffff"


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # PIL without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _dashed_rectangle(
    draw: ImageDraw.ImageDraw, box: Sequence[float], colour: str, width: int, dash: int
) -> None:
    x1, y1, x2, y2 = box
    edges = (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1)))
    for (ax, ay), (bx, by) in edges:
        length = max(abs(bx - ax), abs(by - ay))
        steps = max(1, int(length // (2 * dash)))
        for k in range(steps + 1):
            t0 = min(1.0, 2 * k * dash / max(length, 1e-6))
            t1 = min(1.0, (2 * k + 1) * dash / max(length, 1e-6))
            if t0 >= 1.0:
                break
            start = (ax + (bx - ax) * t0, ay + (by - ay) * t0)
            end = (ax + (bx - ax) * t1, ay + (by - ay) * t1)
            draw.line([start, end], fill=colour, width=width)


def _label(
    draw: ImageDraw.ImageDraw,
    box: Sequence[float],
    text: str,
    bg: str,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    image_size: tuple[int, int],
) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left, bottom - top
    pad = max(1, th // 5)
    x = min(max(0.0, box[0]), max(0.0, image_size[0] - tw - 2 * pad))
    y = box[1] - th - 2 * pad
    if y < 0:  # no room above the box: draw the label inside its top edge
        y = box[1]
    draw.rectangle([x, y, x + tw + 2 * pad, y + th + 2 * pad], fill=bg)
    draw.text((x + pad - left, y + pad - top), text, fill=_text_colour(bg), font=font)


def fit_for_display(
    image: np.ndarray | Image.Image, *, min_side: int = 0, max_side: int = 0
) -> tuple[Image.Image, float]:
    """Resize for display: small images are enlarged (labels stay readable), huge ones shrunk.

    Returns:
        The RGB PIL image and the scale applied (new size / old size).
    """
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    pil = pil.convert("RGB")
    scale = 1.0
    if min_side and min(pil.size) < min_side:
        scale = min_side / min(pil.size)
    if max_side and max(pil.size) * scale > max_side:
        scale = max_side / max(pil.size)
    if scale != 1.0:
        size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
        pil = pil.resize(size, Image.BICUBIC if scale > 1 else Image.LANCZOS)
    return pil, scale


def draw_detections(
    image: np.ndarray | Image.Image,
    detections: Detections,
    class_names: Sequence[str],
    *,
    highlight: np.ndarray | None = None,
    min_side: int = 0,
    box_scale: float = 1.0,
) -> Image.Image:
    """Draw boxes, class names and scores on a copy of `image`.

    Args:
        image: uint8 RGB [H, W, 3] (or a PIL image) in the detections' coordinates.
        detections: boxes in original pixels.
        class_names: contiguous class index -> name (indices beyond it are shown as numbers).
        highlight: bool [N]; True boxes are drawn in the highlight style (dashed magenta).
        min_side: enlarge the image so its shorter side is at least this (0 = never); boxes are
            scaled with it. Lines and labels are sized from the output image.
        box_scale: factor from detection coordinates to `image` pixels (when `image` is a
            resized copy of the image the detections refer to).

    Returns:
        A new RGB PIL image.
    """
    if highlight is not None and len(highlight) != len(detections):
        raise ValueError(f"highlight has {len(highlight)} entries for {len(detections)} detections")
    canvas, scale = fit_for_display(image, min_side=min_side)
    scale *= box_scale
    draw = ImageDraw.Draw(canvas)
    longest = max(canvas.size)
    width = max(2, round(longest / 320))
    font = _font(max(11, round(longest / 48)))
    order = np.argsort(detections.scores, kind="stable")  # highest score drawn last (on top)
    for i in order:
        box = [float(v) * scale for v in detections.boxes[i]]
        label = int(detections.labels[i])
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        text = f"{name} {float(detections.scores[i]):.2f}"
        if highlight is not None and highlight[i]:
            _dashed_rectangle(draw, box, HIGHLIGHT, width + 1, dash=max(4, 3 * width))
            _label(draw, box, text, HIGHLIGHT, font, canvas.size)
        else:
            colour = class_colour(label)
            draw.rectangle(box, outline=colour, width=width)
            _label(draw, box, text, colour, font, canvas.size)
    return canvas
