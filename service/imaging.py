"""Bytes in, bytes out: decode and validate uploads, draw maps over images, encode PNG.

Nothing here knows about models or HTTP; errors are ImageError subclasses that carry the HTTP
status the API answers with.
"""

from __future__ import annotations

import io
import math
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pillow_heif
from cmap import Colormap
from isal import isal_zlib
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from schemas.media import MAX_SIDES, MEDIA_TYPES  # noqa: F401 - the methods reach them here
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


# A library's own text as it reaches a client: its first line, after the last reference to a source
# file (torchvision's "decode_jpeg, /__w/.../decode_jpeg.cpp:171, Invalid JPEG file structure: ...")
# and never a trace; what is left is the library's reason (or nothing).
_SOURCE = re.compile(r"\S*\.(?:c|cc|cpp|cxx|h|hpp|cu|py|pyx)\b(?::\d+)?|File \"", re.IGNORECASE)


def library_words(e: BaseException, limit: int = 200) -> str:
    """The reason a library gives in `e`, fit for a client: no source path, line number or trace."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines and "Traceback" not in lines[0] else ""
    found = list(_SOURCE.finditer(text))
    if found:
        text = text[found[-1].end():]
    text = text.strip(" ,:;-")
    if _SOURCE.search(text) or "/" in text or "\\" in text:  # nothing of a path survives
        text = ""
    return text[:limit] or type(e).__name__


class NotAnImage(ImageError):
    """Bytes in no format PIL recognises (422; the API answers 415 when the body declared an image
    type the service does not take, service/api/parsing.py)."""


# The formats the service decodes (docs/operations.md, Errors); PIL is never asked to try any other. MPO is
# how PIL names a JPEG that carries more pictures (phones write them): its first one is a JPEG. HEIF
# (HEIC, what phones save) is pillow-heif's plugin, registered here, AVIF Pillow's own (libavif): both
# decode a whole frame in one call of their library, after the same checks of its declared size as
# every other format; pillow-heif decodes on one thread (the service's cores are split between its
# workers) and lists no thumbnails, depth or auxiliary images.
pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False, decode_threads=1)
ACCEPTED = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF")
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
# An overlay up to this many pixels keeps its float32 rows between its two passes (12 MB at most).
KEEP_PIXELS = 1 << 20


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
        raise NotAnImage(f"the upload is not a decodable image ({', '.join(ACCEPTED)})") from None
    except TimeoutError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is the upload's fault
        raise ImageError(f"the image could not be read: {library_words(e)}") from None
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
            raise ImageError(f"the image is corrupt: a part of it ({x1 - x0}x{y1 - y0} at {x0},{y0}) "
                             f"lies outside its {w}x{h} frame")
    if fmt == "JPEG":
        scans = data.count(b"\xff\xda")  # SOS markers; entropy-coded data stuffs every 0xFF
        if scans > MAX_JPEG_SCANS:
            raise ImageError(f"the JPEG has {scans} scans, more than the {MAX_JPEG_SCANS} accepted")
    return img


# -- decoding for what the answer needs ----------------------------------------------------------
# A JPEG much larger than what is needed is decoded at a reduced DCT scale (1/2, 1/4 or 1/8, as
# libjpeg offers): the largest reduction whose result is still at least DRAFT_MARGIN times the
# model's input on both sides, and at least the canvas (the picture drawn over the upload). The
# final resize to the input size then still averages over DRAFT_MARGIN or more decoded pixels per
# input pixel. Other formats decode whole; their resizes reduce by whole factors first
# (Pillow's reducing_gap), which changes nothing for images at or below the target size.
DRAFT_MARGIN = 2
REDUCING_GAP = 2.0  # 1920 x 1280 -> 224 bicubic: 7 ms against 18 ms without, within 2 grey levels (mean 0.24)


@dataclass(frozen=True)
class Target:
    """What an answer needs of an upload: the model's input, and the picture the answer draws on.

    canvas: None, no picture (a JSON answer); 0, a picture at the upload's own size; n > 0, a
    picture whose longest side is at most n (never larger than the upload).
    """

    input_size: tuple[int, int]  # (H, W) the model takes
    resample: Image.Resampling = Image.Resampling.BICUBIC
    canvas: int | None = None
    # Leave a JPEG that needs no EXIF turn (and no canvas) encoded, for the model's device to
    # decode whole (service/engine/device_decode.py): Decoded.pixels is then None.
    keep_jpeg: bool = False


@dataclass
class Decoded:
    """An upload made ready: the model's input and, when the answer draws one, its canvas."""

    pixels: np.ndarray | None  # (H, W, 3) uint8 at the model's input size, squash-resized (no crop)
    canvas: Image.Image | None  # RGB at the answer's size, or None
    decoded_size: tuple[int, int]  # (w, h) of what was (or, left encoded, will be) decoded
    encoded: bytes | None = None  # the JPEG left encoded (target.keep_jpeg), else None


def _kept(img: Image.Image, data: bytes, target: Target) -> bool:
    """Is this upload left encoded for the device (see Target.keep_jpeg)? Only a JPEG that ends
    with its end-of-image marker: a device decoder may pad a truncated one where Pillow refuses it."""
    return (target.keep_jpeg and target.canvas is None and img.format == "JPEG"
            and data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9") and img.getexif().get(0x0112, 1) == 1)


def canvas_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(w, h) of an upload of `size` drawn with its longest side at most max_side (0: as it is)."""
    w, h = size
    if max_side <= 0 or max(w, h) <= max_side:
        return w, h
    s = max_side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the picture by 90 degrees


def _draft(img: Image.Image, target: Target) -> None:
    """Ask a JPEG's decoder for the smallest DCT scale that still covers what `target` needs."""
    if img.format not in ("JPEG", "MPO"):
        return
    h, w = target.input_size
    need_w, need_h = w * DRAFT_MARGIN, h * DRAFT_MARGIN
    if target.canvas is not None:
        cw, ch = canvas_size(_upright(img), target.canvas)
        need_w, need_h = max(need_w, cw), max(need_h, ch)
    if img.getexif().get(0x0112) in _SWAPS_SIDES:
        need_w, need_h = need_h, need_w  # the request is in the stored orientation
    if img.width >= 2 * need_w and img.height >= 2 * need_h:
        img.draft(None, (need_w, need_h))


def _upright(img: Image.Image) -> tuple[int, int]:
    """(w, h) of a JPEG after its EXIF orientation is applied. JPEG only: its EXIF is in a header
    segment, where other formats' getexif() may decode the whole image to find it."""
    w, h = img.size
    return (h, w) if img.getexif().get(0x0112) in _SWAPS_SIDES else (w, h)


def cost(data: bytes, max_pixels: int, target: Target, frames: int = 1) -> int:
    """Pixels that preparing this upload for `target` holds at once: the decoded frame plus
    `frames` pictures of the canvas's size. Reads headers only; raises what `prepare` would."""
    img = open_checked(data, max_pixels)
    if not _kept(img, data, target):
        _draft(img, target)
    w, h = img.size
    pictures = 0
    if target.canvas is not None:  # turned or not by its EXIF orientation: the same pixel count
        cw, ch = canvas_size(img.size, target.canvas)
        pictures = cw * ch * frames
    return w * h + pictures


def prepare(data: bytes, max_pixels: int, target: Target) -> Decoded:
    """Upload bytes -> the model's input (uint8 at the input size) and the answer's canvas.

    Decodes once, at the reduced DCT scale `target` allows (JPEG), then resizes once to the
    input size, and once to the canvas; the canvas never comes from an image larger than the
    answer's size. Errors as `decode`.
    """
    img = open_checked(data, max_pixels)
    if _kept(img, data, target):
        return Decoded(pixels=None, canvas=None, decoded_size=img.size, encoded=data)
    _draft(img, target)
    rgb = _load(img)
    decoded = rgb.size
    small = to_input(rgb, target.input_size, target.resample)
    budget.check_deadline("decoding the image")
    canvas = None
    if target.canvas is not None:
        size = canvas_size(rgb.size, target.canvas)
        canvas = rgb if size == rgb.size else rgb.resize(size, Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
    return Decoded(pixels=np.asarray(small), canvas=canvas, decoded_size=decoded)


def to_input(rgb: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """RGB image -> (H, W, 3) uint8 at size (H, W): the whole image squash-resized, no crop."""
    h, w = size
    return np.array(rgb if rgb.size == (w, h) else rgb.resize((w, h), resample, reducing_gap=REDUCING_GAP))  # writable


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
    return _load(open_checked(data, max_pixels))


def _load(img: Image.Image) -> Image.Image:
    """An opened, checked (and maybe drafted) image -> decoded RGB, upright; see `decode`."""
    size = img.size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            if img.size != size:  # no accepted plugin grows its frame on load; refuse one that would
                raise ImageError(f"the image decoded to {img.size[0]}x{img.size[1]}, "
                                 f"not the {size[0]}x{size[1]} it declares")
            budget.check_deadline("decoding the image")
            ImageOps.exif_transpose(img, in_place=True)  # no copy when there is nothing to turn
            return to_rgb(img)
    except (ImageError, TimeoutError):
        raise
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data, whatever the decoder says
        raise ImageError(f"the image is truncated or corrupt: {library_words(e)}") from None


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
    up to KEEP_PIXELS (a default-size answer, 1024 x 1024) is computed once and kept between the
    passes (12 bytes a pixel), larger ones are computed again in the second pass.
    """
    lut255 = _lut(colormap) * np.float32(255.0)  # in units of 1/255, so the image adds as it is
    w, h = img.size

    def chunks():
        for y0, y1, m in _upsampled_rows(mask, img.size):
            heat = np.take(lut255, (m * 255.0).astype(np.uint8), axis=0)  # (rows, W, 3): 255 x jet(mask)
            np.add(heat, np.asarray(img.crop((0, y0, w, y1))), out=heat)  # 255 x (jet(mask) + image / 255)
            yield y0, y1, heat

    one_chunk = list(chunks()) if w * h <= KEEP_PIXELS else None

    def passes():
        return iter(one_chunk) if one_chunk is not None else chunks()

    peak = max(max((float(cam.max()) for _, _, cam in passes()), default=0.0), 1e-12)
    out = np.empty((h, w, 3), np.uint8)
    scale = np.float32(255.0 / peak)
    for y0, y1, cam in passes():
        cam *= scale
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


def montage(img: Image.Image, maps: np.ndarray, colormap: str = "jet", max_side: int = 2**31 - 1) -> np.ndarray:
    """One overlay tile per map (L, gh, gw), laid out row-major in a near-square grid -> uint8 RGB.

    Tiles are TILE px, smaller when a sheet of them would be wider or taller than max_side (the
    encoder's limit, MAX_SIDES): a model of thousands of blocks still fits its format."""
    cols = math.ceil(math.sqrt(len(maps)))
    rows = math.ceil(len(maps) / cols)
    box = max(1, min(TILE, (max_side + GAP) // max(cols, rows) - GAP))
    thumb = _thumbnail(img, (box, box))
    tw, th = thumb.size
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


# -- encoding ---------------------------------------------------------------------------------
JPEG_QUALITY = 90
WEBP_QUALITY = 80
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type: grey, RGB, RGBA


def encode(arr: np.ndarray, fmt: str) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> the bytes of a `fmt` picture (png, jpeg or webp)."""
    if fmt == "png":
        return encode_png(arr)
    buf = _Writer()
    if fmt == "jpeg":  # libjpeg-turbo: about 3 ms for 1024 x 683
        Image.fromarray(arr).save(buf, format="JPEG", quality=JPEG_QUALITY)
    elif fmt == "webp":  # method 0 is libwebp's fastest (about 4x method 4, the default, for 5% more bytes)
        Image.fromarray(arr).save(buf, format="WEBP", quality=WEBP_QUALITY, method=0)
    else:
        raise ValueError(f"no encoder for {fmt!r}")
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def encode_png(arr: np.ndarray) -> bytes:
    """uint8 (H, W), (H, W, 3) or (H, W, 4) -> PNG bytes, fast rather than small.

    Every row uses PNG's "Up" filter (the difference to the row above, modulo 256), computed by
    numpy, and the filtered rows are deflated by ISA-L at level 1. Pillow's encoder chooses a
    filter per row by trying all five, which dominates its time: a 1024 x 683 overlay of a photo
    took 71 ms with Pillow (Z_RLE, level 1) and takes 9 ms here for the same size (1.36 MB).
    Rows are filtered and compressed in chunks, checking the deadline between them.
    """
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in _PNG_COLOUR):
        raise ValueError(f"cannot write a {arr.dtype} array of shape {arr.shape} as PNG")
    h, w = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    rows = arr.reshape(h, w * channels)
    deflate = isal_zlib.compressobj(1)
    idat = []
    step = _rows_per_chunk(w * channels)
    for y0 in range(0, h, step):
        budget.check_deadline("encoding the answer")
        y1 = min(h, y0 + step)
        block = np.empty((y1 - y0, w * channels + 1), np.uint8)
        block[:, 0] = 2  # filter type Up
        np.subtract(rows[y0:y1], rows[y0 - 1 : y1 - 1] if y0 else np.vstack([np.zeros_like(rows[:1]), rows[: y1 - 1]]),
                    out=block[:, 1:])
        idat.append(deflate.compress(block))
    idat.append(deflate.flush())
    header = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOUR[channels], 0, 0, 0)
    return b"".join((_PNG_SIGNATURE, _png_chunk(b"IHDR", header), _png_chunk(b"IDAT", b"".join(idat)),
                     _png_chunk(b"IEND", b"")))
