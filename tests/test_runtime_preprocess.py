"""Tests of pgd_deploy.runtime.preprocess: decoding, EXIF, modes, letterbox and error messages."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pgd_deploy.runtime.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDecodeError,
    ImageTransform,
    denormalize,
    letterbox,
    load_image,
    normalize,
    preprocess,
)


def _gradient(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(
        np.uint8
    )


# --------------------------------------------------------------------------------------------
# load_image
# --------------------------------------------------------------------------------------------


def test_png_round_trip_is_exact(tmp_path: Path) -> None:
    image = _gradient(17, 23)
    Image.fromarray(image).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (17, 23, 3)
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize("orientation, expected", [(1, "same"), (3, "rot180"), (6, "rot270")])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, expected: str) -> None:
    image = np.zeros((10, 20, 3), np.uint8)
    image[0, 0] = 255  # a white top-left pixel marks the orientation
    pil = Image.fromarray(image)
    exif = pil.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "exif.png"
    pil.save(path, exif=exif)
    out = load_image(path)
    if expected == "same":
        assert out.shape == (10, 20, 3) and out[0, 0, 0] == 255
    elif expected == "rot180":
        assert out.shape == (10, 20, 3) and out[-1, -1, 0] == 255
    else:  # orientation 6: the stored image must be turned 90 degrees clockwise to display
        assert out.shape == (20, 10, 3) and out[0, -1, 0] == 255


# 8-bit grey values of a 3x4 test image, and the 16-bit samples whose high byte they are.
GREY8 = np.array([[0, 1, 2, 3], [100, 127, 128, 129], [200, 254, 255, 255]], np.uint8)
GREY16 = GREY8.astype(np.uint16) << 8 | np.array([[0, 255, 1, 128]] * 3, np.uint16)


def _expect_grey(out: np.ndarray, grey: np.ndarray) -> None:
    assert out.dtype == np.uint8 and out.shape == (*grey.shape, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def _png48(path: Path, rgb16: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot write one)."""
    import struct
    import zlib

    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "mode, file_name",
    [("I;16", "g16.png"), ("I;16", "g16.tiff"), ("I;16B", "g16b.tiff")],
)
def test_16_bit_grey_files_keep_their_high_byte(tmp_path: Path, mode: str, file_name: str) -> None:
    # A 16-bit PNG used to saturate to an all-white image.
    dtype = ">u2" if mode == "I;16B" else np.uint16
    pil = Image.fromarray(GREY16.astype(dtype))
    assert pil.mode == mode
    pil.save(tmp_path / file_name)
    with Image.open(tmp_path / file_name) as reopened:
        assert reopened.mode == mode  # the decoder really sees this mode
    _expect_grey(load_image(tmp_path / file_name), GREY8)


def test_16_bit_colour_png_keeps_its_high_byte(tmp_path: Path) -> None:
    rgb16 = np.stack([GREY16, GREY16[::-1], 65535 - GREY16], -1)
    _png48(tmp_path / "rgb48.png", rgb16)
    np.testing.assert_array_equal(load_image(tmp_path / "rgb48.png"), (rgb16 >> 8).astype(np.uint8))


def test_32_bit_integer_pixels_are_read_as_16_bit_data(tmp_path: Path) -> None:
    pil = Image.fromarray(GREY16.astype(np.int32))
    assert pil.mode == "I"
    pil.save(tmp_path / "i32.tiff")
    _expect_grey(load_image(tmp_path / "i32.tiff"), GREY8)
    _expect_grey(load_image(pil), GREY8)
    with pytest.raises(ImageDecodeError, match=r"i32: 32-bit integer pixels range from -5 to "):
        load_image(Image.fromarray(GREY16.astype(np.int32) - 5), name="i32")
    with pytest.raises(ImageDecodeError, match=r"expected 16-bit data \(0..65535\)"):
        load_image(Image.fromarray(GREY16.astype(np.int32) + 65535), name="i32")


def test_32_bit_float_pixels_scale_from_0_1_or_0_255(tmp_path: Path) -> None:
    unit = Image.fromarray(GREY8.astype(np.float32) / 255)
    assert unit.mode == "F"
    unit.save(tmp_path / "unit.tiff")
    _expect_grey(load_image(tmp_path / "unit.tiff"), GREY8)
    near = np.minimum(GREY8.astype(np.float32) + 0.3, 255.0)  # 0..255 floats round to GREY8
    _expect_grey(load_image(Image.fromarray(near)), GREY8)
    with pytest.raises(ImageDecodeError, match=r"f: 32-bit float pixels range from 0 to 300"):
        load_image(Image.fromarray(np.array([[0.0, 300.0]], np.float32)), name="f")
    with pytest.raises(ImageDecodeError, match="f: 32-bit float pixels include NaN"):
        load_image(Image.fromarray(np.array([[0.5, np.nan]], np.float32)), name="f")


def test_8_bit_modes_become_the_rgb_a_viewer_shows(tmp_path: Path) -> None:
    rgb = _gradient(8, 9)
    base = Image.fromarray(rgb)
    grey = np.asarray(base.convert("L"))
    # Files a user hands in: grey, grey + alpha, palette (+ alpha), bilevel, RGBA.
    base.convert("L").save(tmp_path / "l.png")
    _expect_grey(load_image(tmp_path / "l.png"), grey)
    base.convert("LA").save(tmp_path / "la.png")
    _expect_grey(load_image(tmp_path / "la.png"), grey)
    rgba = np.concatenate([rgb, np.full((8, 9, 1), 9, np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), rgb)
    palette = base.quantize(16)
    palette.save(tmp_path / "p.png")
    expected = np.asarray(palette.convert("RGB"))
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"), expected)
    palette.save(tmp_path / "p_transparent.png", transparency=0)
    np.testing.assert_array_equal(load_image(tmp_path / "p_transparent.png"), expected)
    np.testing.assert_array_equal(load_image(palette.convert("PA")), expected)
    bilevel = Image.fromarray(grey).point(lambda v: 255 if v >= 128 else 0).convert("1")
    bilevel.save(tmp_path / "one.png")
    _expect_grey(load_image(tmp_path / "one.png"), np.where(grey >= 128, 255, 0))


def test_cmyk_and_other_colour_spaces_convert_to_rgb(tmp_path: Path) -> None:
    # CMYK: no ink is white, full cyan is (0, 255, 255), full black ink is black.
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tiff")
    np.testing.assert_array_equal(
        load_image(tmp_path / "cmyk.tiff"), [[[255, 255, 255], [0, 255, 255], [0, 0, 0]]]
    )
    rgb = _gradient(6, 7)
    for mode in ("YCbCr", "HSV", "LAB"):
        converted = Image.fromarray(rgb).convert(mode)
        out = load_image(converted)
        np.testing.assert_array_equal(out, np.asarray(converted.convert("RGB")))
        assert np.abs(out.astype(int) - rgb).max() <= 30, mode  # a lossy round trip, no more


def test_modes_pil_cannot_convert_are_refused_with_the_mode() -> None:
    la_premultiplied = Image.new("La", (4, 3))
    with pytest.raises(ImageDecodeError, match="odd: unsupported image mode 'La'"):
        load_image(la_premultiplied, name="odd")


def test_grayscale_is_replicated_to_three_channels(tmp_path: Path) -> None:
    gray = _gradient(6, 7)[..., 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_arrays_bytes_and_pil_inputs() -> None:
    image = _gradient(5, 6)
    np.testing.assert_array_equal(load_image(image), image)
    rgba = np.concatenate([image, np.full((5, 6, 1), 7, np.uint8)], -1)
    np.testing.assert_array_equal(load_image(rgba), image)
    np.testing.assert_array_equal(load_image(image[..., 0])[..., 2], image[..., 0])
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    np.testing.assert_array_equal(load_image(buf.getvalue()), image)
    np.testing.assert_array_equal(load_image(Image.fromarray(image)), image)


def _jpeg(tmp_path: Path) -> Path:
    path = tmp_path / "ok.jpg"
    Image.fromarray(_gradient(64, 64)).save(path, quality=90)
    return path


BAD_FILES = {
    "missing": (None, "missing: file not found"),
    "empty": (b"", "empty: empty file"),
    "non-image": (b"hello, not an image", "non-image: not a recognised image format"),
    "corrupt": (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "corrupt: "),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_files_raise_image_decode_error_naming_the_file(tmp_path: Path, name: str) -> None:
    content, message = BAD_FILES[name]
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=message) as info:
        load_image(path)
    assert isinstance(info.value, ValueError)


def test_links_pipes_and_folders_are_refused_with_what_they_are(tmp_path: Path) -> None:
    import os

    (tmp_path / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "loop_a.jpg").symlink_to(tmp_path / "loop_b.jpg")
    (tmp_path / "loop_b.jpg").symlink_to(tmp_path / "loop_a.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")  # opening it would block: it must never be opened
    (tmp_path / "folder.jpg").mkdir()
    expected = {
        "broken.jpg": "broken symbolic link",
        "loop_a.jpg": "symbolic link loop",
        "pipe.jpg": r"a FIFO \(named pipe\), not a regular file",
        "folder.jpg": "a folder, not an image file",
    }
    for name, message in expected.items():
        with pytest.raises(ImageDecodeError, match=f"{name}: {message}"):
            load_image(tmp_path / name, name=name)


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = _jpeg(tmp_path).read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="cut.jpg: corrupt or truncated"):
        load_image(cut)


def test_empty_bytes_and_bad_arrays() -> None:
    with pytest.raises(ImageDecodeError, match="empty input"):
        load_image(b"", name="upload")
    with pytest.raises(ImageDecodeError, match=r"expected an array \[H, W, 3\]"):
        load_image(np.zeros((2, 3, 5), np.uint8))
    with pytest.raises(ImageDecodeError, match="expected a uint8 array"):
        load_image(np.zeros((2, 3, 3), np.float32))


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    # A 1-bit 6000x6000 PNG is tiny on disk but 36 MP once decoded.
    path = tmp_path / "bomb.png"
    Image.new("1", (6000, 6000)).save(path, optimize=True)
    assert path.stat().st_size < 100_000
    with pytest.raises(ImageDecodeError, match="36000000 pixels exceeds the limit of 1000000"):
        load_image(path, max_pixels=1_000_000)
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        load_image(path.read_bytes(), name="upload.png", max_pixels=1_000_000)


# --------------------------------------------------------------------------------------------
# letterbox
# --------------------------------------------------------------------------------------------


def test_normalize_and_denormalize_are_inverse() -> None:
    image = _gradient(9, 11)
    chw = normalize(image)
    assert chw.shape == (3, 9, 11) and chw.dtype == np.float32
    expected = (image[4, 5, 1] - IMAGENET_MEAN[1]) / IMAGENET_STD[1]
    assert chw[1, 4, 5] == pytest.approx(expected, rel=1e-5)
    np.testing.assert_array_equal(denormalize(chw), image)


@pytest.mark.parametrize("h, w", [(100, 200), (200, 100), (64, 64), (30, 50)])
def test_letterbox_fits_pads_bottom_right_and_round_trips(h: int, w: int) -> None:
    image = _gradient(h, w)
    out, tf = letterbox(image, (64, 96))
    assert out.shape == (3, 64, 96) and out.dtype == np.float32
    assert tf.resized_h <= 64 and tf.resized_w <= 96
    assert tf.resized_h == 64 or tf.resized_w == 96  # the image touches one border
    assert np.all(out[:, tf.resized_h :, :] == 0) and np.all(out[:, :, tf.resized_w :] == 0)
    # Network boxes map back onto the original image.
    net_box = np.array([[0, 0, tf.resized_w, tf.resized_h]], np.float32)
    np.testing.assert_allclose(tf.to_original(net_box), [[0, 0, w, h]], atol=1e-3)
    # A point maps back to (about) the same pixel colour.
    y, x = tf.resized_h // 2, tf.resized_w // 2
    back = tf.to_original(np.array([[x, y, x, y]], np.float32))[0]
    orig = image[min(int(back[1]), h - 1), min(int(back[0]), w - 1)].astype(int)
    got = denormalize(out)[y, x].astype(int)
    assert np.abs(orig - got).max() <= 12


def test_to_original_clips_to_the_image() -> None:
    tf = ImageTransform(0.5, 0.5, 40, 60, 20, 30)
    boxes = np.array([[-5, -5, 40, 40], [10, 5, 20, 10]], np.float32)
    np.testing.assert_allclose(tf.to_original(boxes), [[0, 0, 60, 40], [20, 10, 40, 20]])


def test_preprocess_batches_mixed_sizes() -> None:
    images = [_gradient(30, 40), _gradient(50, 20), _gradient(64, 64)]
    batch, tfs = preprocess(images, (64, 64))
    assert batch.shape == (3, 3, 64, 64)
    assert [(t.orig_h, t.orig_w) for t in tfs] == [(30, 40), (50, 20), (64, 64)]
    for i, im in enumerate(images):
        np.testing.assert_array_equal(batch[i], letterbox(im, (64, 64))[0])
