"""Bytes in, bytes out: decode and validate uploads, draw maps over images, encode PNG.

Nothing here knows about models or HTTP; errors are ImageError subclasses that carry the HTTP
status the API answers with.
"""

from __future__ import annotations

import io
import math
import warnings
import zlib
from functools import lru_cache

import numpy as np
from cmap import Colormap
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from service import budget

# We check the pixel count ourselves, from the header, before decoding anything.
Image.MAX_IMAGE_PIXELS = None

TILE = 224  # side of one tile in the per-layer attention montage
GAP = 4  # pixels between montage tiles


class ImageError(ValueError):
    """The upload is not an image we can use. `status` is the HTTP status to answer with."""

    status = 422


class ImageTooLarge(ImageError):
    status = 413


class UnsupportedFormat(ImageError):
    """An image in a format PIL knows but the service does not accept (ICO, PSD, ...)."""

    status = 415


# The formats the service decodes (README, Errors); PIL is never asked to try any other. MPO is
# how PIL names a JPEG that carries more pictures (phones write them): its first one is a JPEG.
ACCEPTED = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_ACCEPTED_AS = {"MPO": "JPEG"}
# A progressive JPEG is decoded scan by scan, each scan over the whole image: libjpeg writes 10
# scans for a colour image, and a few dozen cover any sane script. Thousands of empty scans are
# an attack on the CPU (one such file of 312 KB held a core for 50 s).
MAX_JPEG_SCANS = 100
# PIL decodes a frame tile by tile in a Python loop; a few thousand strips is already a lot.
MAX_TILES = 16384
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated upload is refused, never padded
# Pixels converted or drawn per step: bounds the temporaries of the per-pixel arithmetic.
CHUNK_PIXELS = 1 << 18


class _Reader(io.BytesIO):
    """The upload as PIL reads it: every read first checks the request's deadline, so a decode
    that runs past the timeout stops within one block (PIL feeds decoders 64 KB at a time)."""

    def read(self, *args):  # noqa: ANN001, ANN201
        budget.check_deadline("decoding the image")
        return super().read(*args)


class DeadlineBuffer(io.BytesIO):
    """Encoder output: every block written checks the request's deadline, so that an encode
    past the timeout stops too (PIL writes what it has encoded 64 KB at a time)."""

    def write(self, data):  # noqa: ANN001, ANN201
        budget.check_deadline("encoding the answer")
        return super().write(data)


_Writer = DeadlineBuffer


def _other_format(data: bytes) -> str | None:
    """The name of a format PIL recognises in data's first bytes but the service does not accept."""
    Image.init()
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        if name in ACCEPTED or accept is None:
            continue
        try:
            if accept(prefix) is True:
                return name
        except Exception:  # noqa: BLE001,S112 - a plugin's sniffing failing means it is not that format
            continue
    return None


def open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Upload bytes -> an opened, not yet decoded image whose frame passed every check.

    Reads headers only. Checks, before anything is decoded: the format is accepted; the frame
    PIL will decode (the first, after seek(0)) is at most max_pixels, and each of its tiles lies
    inside it (PIL allocates the frame at img.size and refuses tiles outside it, so the frame's
    size is what decoding costs); a JPEG has at most MAX_JPEG_SCANS scans.
    """
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(_Reader(data), formats=ACCEPTED)
            img.seek(0)
    except UnidentifiedImageError:
        other = _other_format(data)
        if other is not None:
            raise UnsupportedFormat(f"{other} images are not accepted; send {', '.join(ACCEPTED)}") from None
        raise ImageError("the upload is not a decodable image (PNG, JPEG, WebP, GIF, BMP or TIFF)") from None
    except TimeoutError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is the upload's fault
        raise ImageError(f"the image could not be read: {e}") from None
    fmt = _ACCEPTED_AS.get(img.format, img.format)
    if fmt not in ACCEPTED:
        raise UnsupportedFormat(f"{img.format} images are not accepted; send {', '.join(ACCEPTED)}")
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(f"the image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageTooLarge(f"the image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
    tiles = img.tile or []
    if len(tiles) > MAX_TILES:
        raise ImageError(f"the image is stored in {len(tiles)} pieces, more than the {MAX_TILES} accepted")
    for tile in tiles:
        try:
            x0, y0, x1, y1 = (int(v) for v in tile[1])
        except (TypeError, ValueError, IndexError):
            raise ImageError("the image is corrupt: a part of it has no valid extent") from None
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h or x1 <= x0 or y1 <= y0:
            raise ImageError(f"the image is corrupt: a part of it ({x1 - x0}x{y1 - y0} at {x0},{y0}) lies outside its {w}x{h} frame")
    if fmt == "JPEG":
        scans = data.count(b"\xff\xda")  # SOS markers; entropy-coded data stuffs every 0xFF
        if scans > MAX_JPEG_SCANS:
            raise ImageError(f"the JPEG has {scans} scans, more than the {MAX_JPEG_SCANS} accepted")
    return img


def inspect(data: bytes, max_pixels: int) -> tuple[int, int]:
    """Upload bytes -> (width, height) of the frame decode() would decode, after every check of
    `open_checked`; nothing is decoded. Raises the ImageError that decode() would raise first."""
    return open_checked(data, max_pixels).size


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """Upload bytes -> RGB image, or ImageError saying what is wrong with them.

    Applies EXIF orientation, takes the first frame of animations, composites transparency on
    white, and maps 16-bit and float images to 8 bits. Checks everything `open_checked` checks
    before decoding, and the request's deadline while decoding (TimeoutError).
    """
    img = open_checked(data, max_pixels)
    size = img.size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            if img.size != size:  # no accepted plugin grows its frame on load; refuse one that would
                raise ImageError(f"the image decoded to {img.size[0]}x{img.size[1]}, not the {size[0]}x{size[1]} it declares")
            budget.check_deadline("decoding the image")
            ImageOps.exif_transpose(img, in_place=True)  # no copy when there is nothing to turn
            return to_rgb(img)
    except (ImageError, TimeoutError):
        raise
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data, whatever the decoder says
        raise ImageError(f"the image is truncated or corrupt: {e}") from None


def _rows_per_chunk(width: int) -> int:
    return max(1, CHUNK_PIXELS // max(1, width))


def _to_8bit(img: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float image -> "L", scaled as before (x / peak * 255, rounded), in
    row chunks: the float64 arithmetic never holds more than CHUNK_PIXELS values at once."""
    arr = np.asarray(img)  # the image's own dtype (uint16, int32 or float32): one copy
    if img.mode == "F":
        peak = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
    else:
        peak = 65535.0 if arr.max(initial=0) > 255 else 255.0
    out = np.empty(arr.shape, np.uint8)
    step = _rows_per_chunk(arr.shape[1])
    for y in range(0, arr.shape[0], step):
        block = arr[y : y + step].astype(np.float64)
        out[y : y + step] = np.clip(block / peak * 255.0 + 0.5, 0, 255)
    del arr
    return Image.fromarray(out, "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency composited on white, high bit depths scaled to 8 bits.

    Memory: at most one converted copy besides the input (an RGB input is returned as it is).
    """
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA") if img.has_transparency_data else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba)  # src * a + white * (1 - a): alpha compositing over opaque white
        return out
    return img if img.mode == "RGB" else img.convert("RGB")


@lru_cache(maxsize=4)
def _lut(name: str) -> np.ndarray:
    """(256, 3) float32 colour table of a named colormap, from the cmap library."""
    return Colormap(name).lut(256)[:, :3].astype(np.float32)


def upsample(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(gh, gw) map -> (H, W) float32, bilinear; size is (W, H) as PIL has it."""
    return np.asarray(Image.fromarray(np.asarray(m, np.float32), mode="F").resize(size, Image.Resampling.BILINEAR))


def _upsampled_rows(m: np.ndarray, size: tuple[int, int]):
    """(y0, y1, rows) chunks of upsample(m, size) clipped to [0, 1], each at most CHUNK_PIXELS:
    PIL resizes the source box that maps onto those rows, with the same coefficients as the
    whole resize (equal to it within float32 rounding), so no full-size float map exists."""
    w, h = size
    src = Image.fromarray(np.asarray(m, np.float32), mode="F")
    gh, gw = np.shape(m)
    step = _rows_per_chunk(w)
    for y0 in range(0, h, step):
        budget.check_deadline("drawing the answer")
        y1 = min(h, y0 + step)
        part = src.resize((w, y1 - y0), Image.Resampling.BILINEAR, box=(0, y0 * gh / h, gw, y1 * gh / h))
        yield y0, y1, np.clip(np.asarray(part), 0.0, 1.0)


def overlay(img: Image.Image, mask: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """The post's heatmap: jet(mask) + image, rescaled so the brightest channel is 1. -> (H, W, 3) uint8.

    Two passes over row chunks (the brightest value first, then the pixels), so that besides the
    image and the uint8 answer only one chunk's float32 temporaries exist at a time; an image of
    one chunk (up to CHUNK_PIXELS, e.g. 224 x 224) is computed once and kept between the passes.
    """
    lut = _lut(colormap)
    w, h = img.size

    def chunks():
        for y0, y1, m in _upsampled_rows(mask, img.size):
            heat = np.take(lut, (m * 255.0).astype(np.uint8), axis=0)  # (rows, W, 3) in [0, 1]
            heat += np.divide(np.asarray(img.crop((0, y0, w, y1))), np.float32(255.0), dtype=np.float32)
            yield y0, y1, heat

    one_chunk = list(chunks()) if w * h <= CHUNK_PIXELS else None

    def passes():
        return iter(one_chunk) if one_chunk is not None else chunks()

    peak = max(max((float(cam.max()) for _, _, cam in passes()), default=0.0), 1e-12)
    out = np.empty((h, w, 3), np.uint8)
    for y0, y1, cam in passes():
        cam /= peak
        cam *= 255.0
        out[y0:y1] = cam  # truncates, as astype(np.uint8) did
    return out


def _thumbnail(img: Image.Image, box: tuple[int, int]) -> Image.Image:
    """What Image.thumbnail(box, BILINEAR) makes of a copy of img (its size rule and its
    reducing_gap of 2), without copying the full-size image first."""
    x, y = box
    if x >= img.width and y >= img.height:
        return img.copy()
    aspect = img.width / img.height

    def round_aspect(number: float, key) -> int:  # noqa: ANN001
        return max(min(math.floor(number), math.ceil(number), key=key), 1)

    if x / y >= aspect:
        x = round_aspect(y * aspect, key=lambda n: abs(aspect - n / y))
    else:
        y = round_aspect(x / aspect, key=lambda n: 0 if n == 0 else abs(aspect - x / n))
    if (x, y) == img.size:
        return img.copy()
    return img.resize((x, y), Image.Resampling.BILINEAR, reducing_gap=2.0)


def montage(img: Image.Image, maps: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """One overlay tile per map (L, gh, gw), laid out row-major in a near-square grid -> uint8 RGB."""
    thumb = _thumbnail(img, (TILE, TILE))
    tw, th = thumb.size
    cols = math.ceil(math.sqrt(len(maps)))
    rows = math.ceil(len(maps) / cols)
    sheet = np.full((rows * th + (rows - 1) * GAP, cols * tw + (cols - 1) * GAP, 3), 255, np.uint8)
    for i, m in enumerate(maps):
        r, c = divmod(i, cols)
        y, x = r * (th + GAP), c * (tw + GAP)
        sheet[y : y + th, x : x + tw] = overlay(thumb, m, colormap)
    return sheet


def grayscale(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(gh, gw) map in [0, 1] -> (H, W) uint8, bilinear upsampling to size (W, H), in row chunks."""
    w, h = size
    out = np.empty((h, w), np.uint8)
    for y0, y1, rows in _upsampled_rows(m, size):
        rows *= 255.0
        rows += 0.5
        out[y0:y1] = rows
    return out


PALETTE_SAMPLE_PIXELS = 1 << 16  # pixels the GIF palette of a frame is chosen from


def to_palette(img: Image.Image) -> Image.Image:
    """An RGB frame -> "P" for GIF, as PIL's own adaptive conversion (median cut, 256 colours), but
    with the palette chosen from a copy of at most PALETTE_SAMPLE_PIXELS: median cut over every
    pixel of a large frame takes seconds (2.7 s for a 10-megapixel heatmap) where choosing it from
    a sample and mapping the frame to it takes 0.2 s. A frame within the sample size is converted
    exactly as before."""
    budget.check_deadline("encoding the answer")
    if img.width * img.height <= PALETTE_SAMPLE_PIXELS:
        return img.quantize(256)
    scale = math.sqrt(PALETTE_SAMPLE_PIXELS / (img.width * img.height))
    sample = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))), Image.Resampling.BOX)
    palette = sample.quantize(256)
    budget.check_deadline("encoding the answer")
    return img.quantize(palette=palette, dither=Image.Dither.NONE)


def encode_png(arr: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> PNG bytes, fast rather than small.

    After PNG's row filters an image is mostly small residuals and runs of them: zlib's run-length
    strategy (Z_RLE: matches at distance 1 only) packs them about as well as full LZ77 at level 1,
    for less time. 224 x 224 heatmap: 4.0 ms and 81 KB against 4.8 ms and 93 KB; 1600 x 1200
    heatmap over a smooth photo: 124 ms, 1.3 MB against 169 ms, 1.6 MB; over a flat one: 81 ms,
    892 KB against 79 ms, 840 KB. (Huffman coding alone was as fast on small images but 20%
    larger on flat ones.)
    """
    buf = _Writer()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
    return buf.getvalue()
