"""Decoding odd but valid images, refusing broken ones, and drawing maps."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service import imaging
from tests.conftest import smooth_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"])
def test_common_formats_decode_to_rgb(fmt):
    out = imaging.decode(encode(smooth_image(0, (40, 30)), fmt), max_pixels=10**6)
    assert out.mode == "RGB" and out.size == (40, 30)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    out = imaging.decode(encode(rgba, "PNG"), 10**6)
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_greyscale_is_scaled_not_clipped():
    arr = np.full((8, 8), 65535 // 2, np.uint16)
    out = imaging.decode(encode(Image.fromarray(arr), "PNG"), 10**6)
    assert abs(out.getpixel((0, 0))[0] - 128) <= 1


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    out = imaging.decode(encode(img, "JPEG", exif=exif), 10**6)
    assert out.size == (20, 40)


@pytest.mark.parametrize("data, needle", [
    (b"", "empty"),
    (b"not an image at all", "not a decodable image"),
])
def test_unusable_bytes_are_refused_with_a_reason(data, needle):
    with pytest.raises(imaging.ImageError, match=needle):
        imaging.decode(data, 10**6)


def test_truncated_image_is_refused():
    data = encode(smooth_image(1, (64, 64)), "PNG")
    with pytest.raises(imaging.ImageError):
        imaging.decode(data[: len(data) // 2], 10**6)


def test_too_many_pixels_is_refused_before_decoding():
    with pytest.raises(imaging.ImageTooLarge) as e:
        imaging.decode(encode(Image.new("L", (100, 100)), "PNG"), max_pixels=9_999)
    assert e.value.status == 413


def test_overlay_follows_the_post_and_keeps_the_image_size():
    img = Image.new("RGB", (30, 20), (0, 0, 0))
    mask = np.zeros((2, 3), np.float32)
    mask[0, 0] = 1.0
    out = imaging.overlay(img, mask)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    # black image: the answer is jet(mask), divided by its brightest value over the whole image
    assert out.max() == 255
    assert out[0, 0, 0] in (127, 128) and out[0, 0, 1] == out[0, 0, 2] == 0  # jet(1) = (0.5, 0, 0)
    assert tuple(out[-1, -1]) == (0, 0, 127) or tuple(out[-1, -1]) == (0, 0, 128)  # jet(0) = (0, 0, 0.5)


def test_grayscale_and_png_roundtrip():
    m = np.array([[0.0, 1.0]], np.float32)
    g = imaging.grayscale(m, (4, 2))
    assert g.shape == (2, 4) and g[0, 0] == 0 and g[0, -1] == 255
    assert Image.open(io.BytesIO(imaging.encode_png(g))).size == (4, 2)
    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(imaging.encode_png(rgb)))), rgb)  # lossless
