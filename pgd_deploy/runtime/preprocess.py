"""Image decoding, resizing, letterboxing and normalisation, written once for every path.

Training, PyTorch evaluation, ONNX Runtime, TensorRT and the web demo all go through these
functions, so accuracy comparisons between backends are like for like.

Conventions: images are uint8 RGB arrays [H, W, 3]; network inputs are float32 [3, H, W],
normalised with the ImageNet mean/std (RGB, 0-255 scale) and padded with zeros (the mean colour)
at the bottom and right, so network pixel (x, y) maps to original pixel (x / sx, y / sy).

Decoding turns every PIL mode a user can hand in into 8-bit RGB, or refuses the file with the
reason (see `to_rgb`): 16-bit samples keep their high byte (v >> 8), as Pillow itself does when it
opens a 16-bit-per-channel colour PNG, so a 16-bit grey image and its colour twin decode alike.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
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
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # unsigned 16-bit greyscale


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
            _check_regular_file(path, label)
            img = Image.open(path)
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise ImageDecodeError(
                f"{label}: {img.width}x{img.height} = {img.width * img.height} pixels exceeds "
                f"the limit of {max_pixels} (possible decompression bomb)"
            )
        return to_rgb(ImageOps.exif_transpose(img), label)  # decodes: truncation surfaces here
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{label}: not a recognised image format") from None
    except Image.DecompressionBombError as err:  # PIL's own check, past 2x its limit
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{pixels[1]} pixels" if pixels else "its size"
        limit = f"the limit of {max_pixels}" if max_pixels is not None else "PIL's limit"
        raise ImageDecodeError(
            f"{label}: {size} exceeds {limit} (possible decompression bomb)"
        ) from None
    except PermissionError as err:  # not a corrupt image: the file cannot be read by this user
        raise ImageDecodeError(f"{label}: permission denied ({err.strerror})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"{label}: corrupt or truncated image ({err})") from None


def _check_regular_file(path: Path, label: str) -> None:
    """Refuse, with the reason, anything that is not a non-empty regular file (never opening a
    FIFO or a device, which could block or stream forever)."""
    try:
        info = path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ImageDecodeError(f"{label}: symbolic link loop") from None
        if path.is_symlink():
            target = os.readlink(path)
            raise ImageDecodeError(f"{label}: broken symbolic link (to {target})") from None
        if err.errno == errno.ENOENT:
            raise ImageDecodeError(f"{label}: file not found") from None
        raise ImageDecodeError(f"{label}: cannot read ({err.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageDecodeError(f"{label}: a folder, not an image file")
    if not stat.S_ISREG(info.st_mode):
        kind = "FIFO (named pipe)" if stat.S_ISFIFO(info.st_mode) else "special file"
        raise ImageDecodeError(f"{label}: a {kind}, not a regular file")
    if info.st_size == 0:
        raise ImageDecodeError(f"{label}: empty file (0 bytes)")


def to_rgb(img: Image.Image, label: str = "image") -> np.ndarray:
    """Any PIL image as uint8 RGB [H, W, 3] (this decodes it).

    - 1, L, LA, P, PA, RGB, RGBA, RGBX, RGBa, CMYK, YCbCr, LAB, HSV: PIL's conversion (alpha is
      dropped, greys are replicated).
    - I;16 / I;16L / I;16B / I;16N (16-bit grey, e.g. a 16-bit PNG): the high byte, v >> 8.
    - I (32-bit integer): read as 16-bit data, v >> 8; values outside 0..65535 are refused.
    - F (32-bit float): 0..1 is scaled by 255 (when the maximum is <= 1), else 0..255 is taken
      as is and rounded; values outside 0..255, NaN and infinity are refused.

    Raises:
        ImageDecodeError: a refused value range or a mode PIL cannot convert (e.g. La).
    """
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(img)  # uint16 in native order, or int32 for "I"
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageDecodeError(
                f"{label}: 32-bit integer pixels range from {values.min()} to {values.max()}; "
                "expected 16-bit data (0..65535)"
            )
        return _grey_to_rgb((values.astype(np.uint32) >> 8).astype(np.uint8))
    if mode == "F":
        return _grey_to_rgb(_float_to_uint8(np.asarray(img, dtype=np.float32), label))
    try:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except ValueError as err:
        if "not supported" not in str(err):
            raise
        raise ImageDecodeError(
            f"{label}: unsupported image mode {mode!r} (cannot convert it to RGB)"
        ) from None


def _float_to_uint8(values: np.ndarray, label: str) -> np.ndarray:
    if not np.isfinite(values).all():
        raise ImageDecodeError(f"{label}: 32-bit float pixels include NaN or infinity")
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if lo < 0 or hi > 255:
        raise ImageDecodeError(
            f"{label}: 32-bit float pixels range from {lo:g} to {hi:g}; expected 0..1 or 0..255"
        )
    scale = 255.0 if hi <= 1.0 else 1.0
    return np.round(values * scale).clip(0, 255).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


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
