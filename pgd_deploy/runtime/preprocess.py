"""Image decoding, resizing, letterboxing and normalisation, written once for every path.

Training, PyTorch evaluation, ONNX Runtime, TensorRT and the web demo all go through these
functions, so accuracy comparisons between backends are like for like.

Conventions: images are uint8 RGB arrays [H, W, 3]; network inputs are float32 [3, H, W],
normalised with the ImageNet mean/std (RGB, 0-255 scale) and padded with zeros (the mean colour)
at the bottom and right, so network pixel (x, y) maps to original pixel (x / sx, y / sy).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255
IMAGENET_STD = (58.395, 57.12, 57.375)  # RGB, 0-255
DEFAULT_MAX_PIXELS = 40_000_000  # decompression-bomb guard for decoding

_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_INV_STD = 1.0 / np.asarray(IMAGENET_STD, dtype=np.float32)

ImageSource = str | os.PathLike | bytes | np.ndarray | Image.Image


class ImageDecodeError(ValueError):
    """An input could not be decoded as an image; the message names the file and the reason."""


@dataclass(frozen=True)
class ImageTransform:
    """How an original image was mapped into the network input.

    Attributes:
        scale_x, scale_y: resized / original size along each axis.
        orig_h, orig_w: original image size, px.
        resized_h, resized_w: size of the image content inside the network input, px.
    """

    scale_x: float
    scale_y: float
    orig_h: int
    orig_w: int
    resized_h: int
    resized_w: int

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Map xyxy boxes [N, 4] from network pixels to original pixels, clipped to the image."""
        scale = np.array([self.scale_x, self.scale_y, self.scale_x, self.scale_y], np.float32)
        out = np.asarray(boxes, dtype=np.float32) / scale
        out[:, 0::2] = out[:, 0::2].clip(0, self.orig_w)
        out[:, 1::2] = out[:, 1::2].clip(0, self.orig_h)
        return out


def _describe(source: ImageSource, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(source).__name__}>"


def load_image(
    source: ImageSource, *, name: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode an image to uint8 RGB [H, W, 3], applying its EXIF orientation.

    Args:
        source: a path, encoded bytes, a PIL image or an array ([H, W], [H, W, 3] or [H, W, 4]).
        name: how to name the input in error messages (defaults to the path).
        max_pixels: refuse images with more pixels than this (None = no limit).

    Raises:
        ImageDecodeError: missing, empty, truncated, oversized or non-image input.
    """
    label = _describe(source, name)
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, label)
    try:
        if isinstance(source, Image.Image):
            img = source
        elif isinstance(source, bytes):
            if not source:
                raise ImageDecodeError(f"{label}: empty input (0 bytes)")
            img = Image.open(io.BytesIO(source))
        else:
            path = Path(source)
            if not path.is_file():
                raise ImageDecodeError(f"{label}: file not found")
            if path.stat().st_size == 0:
                raise ImageDecodeError(f"{label}: empty file (0 bytes)")
            img = Image.open(path)
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise ImageDecodeError(
                f"{label}: {img.width}x{img.height} = {img.width * img.height} pixels exceeds "
                f"the limit of {max_pixels} (possible decompression bomb)"
            )
        img = ImageOps.exif_transpose(img)
        img = img.convert("RGB")  # forces a full decode, so truncation surfaces here
        return np.asarray(img, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{label}: not a recognised image format") from None
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"{label}: refused, {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"{label}: corrupt or truncated image ({err})") from None


def _array_to_rgb(arr: np.ndarray, label: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ImageDecodeError(f"{label}: expected an array [H, W, 3], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ImageDecodeError(f"{label}: expected a uint8 array, got {arr.dtype}")
    return np.ascontiguousarray(arr[:, :, :3])


def resize_scale(h: int, w: int, min_size: int, max_size: int) -> float:
    """Scale that brings the shorter side to `min_size` with the longer side at most `max_size`."""
    scale = min_size / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return scale


def letterbox_scale(h: int, w: int, out_h: int, out_w: int) -> float:
    """Largest scale at which an h x w image fits inside out_h x out_w."""
    return min(out_h / h, out_w / w)


def resize(image: np.ndarray, scale: float) -> tuple[np.ndarray, ImageTransform]:
    """Resize uint8 [H, W, 3] by `scale` (bilinear, PIL); return the image and its transform."""
    h, w = image.shape[:2]
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    return image, ImageTransform(new_w / w, new_h / h, h, w, new_h, new_w)


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> float32 [3, H, W] normalised with the ImageNet mean/std."""
    out = (image.astype(np.float32) - _MEAN) * _INV_STD  # [H, W, 3]
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def letterbox(image: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, ImageTransform]:
    """Fit uint8 [H, W, 3] into a fixed (out_h, out_w) input: resize, normalise, pad bottom-right.

    Returns:
        float32 [3, out_h, out_w] network input and the transform back to the original image.
    """
    out_h, out_w = int(size[0]), int(size[1])
    h, w = image.shape[:2]
    resized, tf = resize(image, letterbox_scale(h, w, out_h, out_w))
    canvas = np.zeros((3, out_h, out_w), dtype=np.float32)
    canvas[:, : tf.resized_h, : tf.resized_w] = normalize(resized)[:, :out_h, :out_w]
    return canvas, tf


def pad_batch(images: Sequence[np.ndarray], size_divisible: int = 32) -> np.ndarray:
    """Stack float32 [3, h_i, w_i] images into [B, 3, H, W], zero-padded bottom-right.

    H and W are the largest sizes rounded up to a multiple of `size_divisible`.
    """
    if not images:
        raise ValueError("pad_batch: expected at least one image")
    max_h = max(im.shape[1] for im in images)
    max_w = max(im.shape[2] for im in images)
    d = max(1, size_divisible)
    out_h, out_w = -(-max_h // d) * d, -(-max_w // d) * d
    batch = np.zeros((len(images), 3, out_h, out_w), dtype=np.float32)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[1], : im.shape[2]] = im
    return batch


def preprocess(
    images: Sequence[np.ndarray], size: Sequence[int]
) -> tuple[np.ndarray, list[ImageTransform]]:
    """Letterbox a list of uint8 RGB images into one float32 batch [B, 3, H, W]."""
    outs = [letterbox(im, size) for im in images]
    return np.stack([o[0] for o in outs]), [o[1] for o in outs]


def denormalize(chw: np.ndarray) -> np.ndarray:
    """Inverse of `normalize`: float32 [3, H, W] -> uint8 [H, W, 3] (for visualisation)."""
    img = chw.transpose(1, 2, 0) / _INV_STD + _MEAN
    return img.clip(0, 255).round().astype(np.uint8)
