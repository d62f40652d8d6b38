"""The decode stage: an upload made into the model's input (uint8 at the input size) and the
answer's canvas, decoding no more than the answer needs.

References are written from the definitions: the full decode (Pillow, no reduced DCT scale),
then one resize of the whole image to the input size (squash, the model's interpolation), and
one resize to the canvas (longest side at most max_side, never enlarged)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service import imaging
from tests.conftest import jpeg_bytes, photo, png_bytes, smooth_image

BICUBIC = Image.Resampling.BICUBIC
TARGET = imaging.Target(input_size=(224, 224), resample=BICUBIC)


def full_path(data: bytes, size=(224, 224)) -> np.ndarray:
    """The reference: decode the whole upload, then resize it to the input size in one step."""
    img = Image.open(io.BytesIO(data))
    img.load()
    img = img.convert("RGB")
    return np.asarray(img.resize((size[1], size[0]), BICUBIC), np.float64)


@pytest.mark.parametrize("size", [(224, 224), (100, 80), (300, 260), (447, 447)])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_images_up_to_twice_the_input_are_decoded_whole_and_unchanged(size, fmt):
    img = smooth_image(1, size)
    data = jpeg_bytes(img) if fmt == "JPEG" else png_bytes(img)
    d = imaging.prepare(data, 10**8, TARGET)
    assert d.decoded_size == size  # no reduced DCT scale below twice the input
    assert d.pixels.dtype == np.uint8 and d.pixels.shape == (224, 224, 3)
    np.testing.assert_array_equal(d.pixels, full_path(data))  # exactly what it was before


@pytest.mark.parametrize("size, decoded", [((4000, 3000), (1000, 750)), ((1920, 1280), (960, 640)),
                                           ((1000, 500), (1000, 500))])
def test_a_large_jpeg_is_decoded_at_the_smallest_dct_scale_still_twice_the_input(size, decoded):
    data = jpeg_bytes(photo(size))
    d = imaging.prepare(data, 10**8, TARGET)
    assert d.decoded_size == decoded
    w, h = decoded
    assert min(w, h) >= 448 or decoded == size  # at least DRAFT_MARGIN x the input, on both sides
    assert imaging.cost(data, 10**8, TARGET) == w * h  # the budget counts what is really decoded
    # close to the full decode: a DCT-scaled decode is a lowpass image of the same picture
    diff = np.abs(d.pixels.astype(np.float64) - full_path(data))
    assert diff.mean() < 1.5 and np.percentile(diff, 99.9) < 12, (diff.mean(), diff.max())


def test_the_canvas_is_at_most_max_side_and_never_enlarged():
    data = jpeg_bytes(photo((1920, 1280)))
    for side, want in ((1024, (1024, 683)), (0, (1920, 1280)), (4000, (1920, 1280)), (100, (100, 67))):
        t = imaging.Target(input_size=(224, 224), resample=BICUBIC, canvas=side)
        d = imaging.prepare(data, 10**8, t)
        assert d.canvas.size == want, side
        # never drawn from less than the canvas: the decode covers it
        assert d.decoded_size[0] >= want[0] and d.decoded_size[1] >= want[1]
        assert imaging.cost(data, 10**8, t, frames=3) == d.decoded_size[0] * d.decoded_size[1] + 3 * want[0] * want[1]
    small = imaging.prepare(png_bytes(smooth_image(2, (64, 48))), 10**8, imaging.Target((224, 224), BICUBIC, 1024))
    assert small.canvas.size == (64, 48)


def test_the_model_input_does_not_depend_on_a_canvas_below_the_decode():
    """A canvas that the model's decode already covers leaves the model's input as it is."""
    data = jpeg_bytes(photo((4000, 3000), seed=3))
    json_like = imaging.prepare(data, 10**8, TARGET)
    drawn = imaging.prepare(data, 10**8, imaging.Target((224, 224), BICUBIC, canvas=448))
    np.testing.assert_array_equal(json_like.pixels, drawn.pixels)


def test_exif_rotation_is_applied_before_both_resizes_with_a_reduced_decode():
    img = photo((3000, 1200), seed=4)  # stored landscape, shown portrait
    exif = Image.Exif()
    exif[0x0112] = 6
    data = jpeg_bytes(img, exif=exif)
    t = imaging.Target(input_size=(224, 224), resample=BICUBIC, canvas=1000)
    d = imaging.prepare(data, 10**8, t)
    assert d.decoded_size == (600, 1500)  # 1/2 scale, upright: 1/4 would leave 300 < 448 across
    assert d.canvas.size == (400, 1000)
    upright = np.asarray(img.transpose(Image.Transpose.ROTATE_270).resize((224, 224), BICUBIC), np.float64)
    assert np.abs(d.pixels - upright).mean() < 3  # the picture's top is the top


def test_pixel_limit_counts_the_declared_frame_not_the_reduced_decode():
    data = jpeg_bytes(photo((3000, 2000)))
    with pytest.raises(imaging.ImageTooLarge):
        imaging.prepare(data, 5_000_000, TARGET)  # 6 MP declared: refused, though 1/4 of it would be decoded
    with pytest.raises(imaging.ImageTooLarge):
        imaging.cost(data, 5_000_000, TARGET)


def test_a_truncated_large_jpeg_is_refused_at_a_reduced_scale_too():
    data = jpeg_bytes(photo((2000, 1600)))
    with pytest.raises(imaging.ImageError, match="truncated|corrupt"):
        imaging.prepare(data[: len(data) // 2], 10**8, TARGET)


@pytest.mark.parametrize("shape", [(2, 4), (5, 3, 3), (300, 7, 3), (600, 1000, 3), (3, 3, 4)])
def test_png_writer_is_lossless(shape):
    arr = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = Image.open(io.BytesIO(imaging.encode_png(arr)))
    out.load()
    np.testing.assert_array_equal(np.asarray(out), arr)


@pytest.mark.parametrize("fmt, pil", [("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_picture_formats_encode_what_they_say(fmt, pil):
    arr = np.asarray(smooth_image(5, (320, 200)))
    out = Image.open(io.BytesIO(imaging.encode(arr, fmt)))
    assert out.format == pil and out.size == (320, 200)
    assert np.abs(np.asarray(out.convert("RGB"), np.float64) - arr).mean() < 6  # lossy, within reason (garbage is ~80)


def test_the_budget_reads_headers_only():
    """A truncated PNG: its cost is known from the header (nothing decoded, no error yet)."""
    data = png_bytes(smooth_image(2, (300, 200)))[:200]
    t = imaging.Target(input_size=(224, 224), resample=BICUBIC, canvas=100)
    assert imaging.cost(data, 10**8, t, frames=2) == 300 * 200 + 2 * 100 * 67
    with pytest.raises(imaging.ImageError):
        imaging.prepare(data, 10**8, t)
