"""What a call sends: its images encoded, its parameters as form fields, and the request that carries them
(a raw image body, multipart, or JSON without an image)."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ImageLike = str | Path | bytes | Image.Image | np.ndarray
Images = ImageLike | Sequence[ImageLike]
Progress = Callable[[int, float], Any]  # (step, objective)
FAITHFULNESS_OPTIONS = ("faithfulness", "faithfulness_steps", "removal", "order")


@dataclass(frozen=True)
class _Call:
    path: str
    fields: dict[str, str]
    images: list[tuple[str, bytes]]
    format: str
    many: bool  # a list of images was given: answer a list
    raw: bool = False  # answer the body's bytes as they came
    form: bool = False  # send a form even for one image (fields a query string does not carry well)
    parse: Callable[[dict[str, Any]], Any] | None = None  # a JSON answer -> the call's result (default Explanation)


def encode_image(img: ImageLike) -> tuple[str, bytes]:
    """(file name, encoded bytes) of any accepted image input."""
    if isinstance(img, (str, Path)):
        p = Path(img)
        return p.name, p.read_bytes()
    if isinstance(img, (bytes, bytearray)):
        return "image", bytes(img)
    if isinstance(img, np.ndarray):
        arr = img
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        img = Image.fromarray(arr)
    if isinstance(img, Image.Image):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return "image.png", buf.getvalue()
    raise TypeError(f"not an image: {type(img).__name__} (give a path, bytes, a PIL image or a numpy array)")


def _field(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


def _fields(params: dict[str, Any], fmt: str) -> dict[str, str]:
    """The form fields of a call: the parameters given (None: the service's default), and the format."""
    return {k: _field(v) for k, v in params.items() if v is not None} | {"format": fmt}




def _faithful(options: dict[str, Any]) -> dict[str, Any]:
    """The faithfulness keywords of a map method's call; anything else is a TypeError, as for a typo."""
    unknown = sorted(set(options) - set(FAITHFULNESS_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    return options



# What an image's first bytes say it is -> the content type of a raw body (service/api/parsing.py)
_RAW_TYPES = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"GIF8", "image/gif"),
              (b"BM", "image/bmp"), (b"II*\0", "image/tiff"), (b"MM\0*", "image/tiff"))


def _raw_type(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[4:8] == b"ftyp":  # an ISO media file: HEIC as phones save it, or AVIF (the server reads which)
        return "image/avif" if data[8:12] in (b"avif", b"avis") else "image/heic"
    return next((ctype for sig, ctype in _RAW_TYPES if data.startswith(sig)), None)


def _request_args(call: _Call, accept: str | None = None) -> dict[str, Any]:
    """One image of a known type: a raw body with the parameters in the query string (no multipart
    to encode or parse); several, or a form-only call: multipart; none: JSON."""
    headers = {"Accept": accept} if accept else {}
    if len(call.images) == 1 and not call.many and not call.form:
        ctype = _raw_type(call.images[0][1])
        if ctype is not None:
            return {"content": call.images[0][1], "params": call.fields, "headers": {**headers, "Content-Type": ctype}}
    if call.images:
        files = [("image", (name, data)) for name, data in call.images]
        return {"data": call.fields, "files": files, "headers": headers}
    return {"json": {k: _json_value(v) for k, v in call.fields.items()}, "headers": headers}


def _json_value(v: str) -> Any:
    """Form values back to JSON types for a body without images (activation maximization from noise)."""
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v
