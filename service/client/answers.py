"""What comes back: the errors, the answers' types, and the checks an answer passes before it is taken
(its status, content type and body, bounded in size and by the call's deadline)."""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from schemas.media import MEDIA_TYPES
from service.client.calls import _Call
from service.client.deadline import _Late, _left

SIGNATURES = {"png": (b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"), "apng": (b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"),
              "jpeg": (b"\xff\xd8\xff", b"\xff\xd9"), "webp": (b"RIFF", b""),
              "gif": (b"GIF8", b";")}
MAX_ANSWER_BYTES = 512 * 1024 * 1024  # largest answer taken
MAX_ERROR_BYTES = 64 * 1024  # of an error answer, what is read for its detail
ANSWER_KEYS = ("mask", "masks", "layers", "map", "predictions", "results")  # an explanation has one at least


class ServiceError(RuntimeError):
    """The service answered with an error: `status` and its `detail`."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail



class AnswerError(ServiceError):
    """The answer is not what was asked for (502: a redirect, another content type, a body that is
    not a PNG/GIF/JSON or is cut short, too large, a broken event stream), or did not come whole
    within the call's deadline (504)."""


@dataclass
class Explanation:
    """One image's JSON answer: `mask` (gh, gw) for mask methods, `masks` (R, gh, gw) for sweeps,
    `layers` (L, gh, gw) for attention, `map` for qk; `faithfulness` when asked (a sweep: one per ratio);
    `raw` is the whole answer."""

    raw: dict[str, Any]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    mask: np.ndarray | None = None
    masks: np.ndarray | None = None
    layers: np.ndarray | None = None
    map: np.ndarray | None = None
    faithfulness: dict[str, Any] | list[dict[str, Any]] | None = None

    @classmethod
    def of(cls, raw: dict[str, Any]) -> Explanation:
        arrays = {k: np.asarray(raw[k], np.float32) for k in ("mask", "masks", "layers", "map") if k in raw}
        return cls(raw=raw, predictions=raw.get("predictions", []), faithfulness=raw.get("faithfulness"), **arrays)


@dataclass
class Comparison:
    """POST /compare's answer: `results` (method, params, mask, faithfulness) in the order asked, their
    `masks` (S, gh, gw), and `ranking`, indices of results best first."""

    raw: dict[str, Any]
    results: list[dict[str, Any]]
    masks: np.ndarray
    ranking: list[int]
    predictions: list[dict[str, Any]]

    @classmethod
    def of(cls, raw: dict[str, Any]) -> Comparison:
        return cls(raw=raw, results=raw["results"], masks=np.asarray([r["mask"] for r in raw["results"]], np.float32),
                   ranking=raw["ranking"], predictions=raw.get("predictions", []))


@dataclass
class Maximized:
    """The answer of long work (activation maximization): the image (PIL, at the model's input size)
    and the objective per step."""

    image: Image.Image
    objective: list[float]
    raw: dict[str, Any]

    @classmethod
    def of(cls, raw: dict[str, Any]) -> Maximized:
        objective = raw["objective"]
        if not isinstance(objective, list):
            raise ValueError("no objective")
        return cls(image=Image.open(io.BytesIO(picture_of(raw))), objective=objective, raw=raw)


def _long_answer_bytes(answer: dict[str, Any]) -> bytes:
    """A streamed result, checked to be long work's answer, as JSON bytes."""
    Maximized.of(answer)
    return json.dumps(answer).encode()


def picture_of(answer: dict[str, Any]) -> bytes:
    """The picture of long work's JSON answer (GET /methods' kind "long"): its `image`, a base64 PNG,
    checked whole (AnswerError otherwise)."""
    try:
        png = base64.b64decode(answer["image"], validate=True)
        if not (png.startswith(SIGNATURES["png"][0]) and png.endswith(SIGNATURES["png"][1])):
            raise ValueError("the image is not a whole PNG")
        Image.open(io.BytesIO(png)).load()
    except (KeyError, TypeError, ValueError, OSError, binascii.Error) as e:
        raise AnswerError(502, f"the answer is not long work's (an image and its objective): "
                               f"{_excerpt(str(e) or type(e).__name__)}") from None
    return png


def _answer(call: _Call, body: dict[str, Any]):
    """A checked JSON answer -> the call's result; an answer without what the call expects is an AnswerError."""
    try:
        if call.parse is not None:
            return call.parse(body)
        if not any(k in body for k in ANSWER_KEYS):
            raise ValueError(f"none of {', '.join(ANSWER_KEYS)} in it")
        if call.many:
            return [Explanation.of(r) for r in body["results"]] if "results" in body else [Explanation.of(body)]
        return Explanation.of(body)
    except (KeyError, TypeError, ValueError, OSError, binascii.Error) as e:
        why = _excerpt(str(e) or type(e).__name__)
        raise AnswerError(502, f"the answer is not what {call.path} answers: {why}") from None


def _parse(call: _Call, resp: httpx.Response, body: _Body):
    """The answer, once its status, content type and body are what the call asked for."""
    _check_status(resp, body)
    media = resp.headers.get("content-type", "").split(";")[0].strip().lower()
    expected = MEDIA_TYPES.get(call.format, "application/json")
    if media != expected:
        raise AnswerError(502, f"the answer is {media or 'of no content type'}, not the {expected} asked for")
    body.check(call.format)
    if call.raw or call.format != "json":
        return body.commit()
    return _answer(call, body.json())


def _get(call: _Call, resp: httpx.Response, body: _Body):
    _check_status(resp, body)
    try:
        return json.loads(body.data().decode("utf-8"))
    except ValueError:
        raise AnswerError(502, f"the answer of {call.path} is not JSON") from None


def _check_stream(resp: httpx.Response, body: _Body) -> None:
    _check_status(resp, body)
    media = resp.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "text/event-stream":
        raise AnswerError(502, f"the answer is {media or 'of no content type'}, not the text/event-stream asked for")



def _check_status(resp: httpx.Response, body: _Body) -> None:
    code = resp.status_code
    if 200 <= code < 300:
        return
    if 300 <= code < 400:
        where = _excerpt(resp.headers.get("location", "nowhere"))
        raise AnswerError(502, f"the service answered a redirect ({code} to {where}); redirects are not followed")
    text = body.text()
    try:
        detail = json.loads(text).get("detail", text)
    except (ValueError, AttributeError):
        detail = _excerpt(text)
    raise ServiceError(code, detail)


def _excerpt(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _counted(size: int, chunk: bytes, limit: int, what: str) -> int:
    """size + len(chunk): the bytes of an answer so far, within `limit` (AnswerError past it) and
    the call's deadline (_Late past it)."""
    size += len(chunk)
    if size > limit:
        raise AnswerError(502, f"{what} is larger than the limit of {limit} bytes")
    left = _left()
    if left is not None and left <= 0:
        raise _Late()
    return size


class _Body:
    """An answer's body as it streams in, at most `limit` bytes: in memory, or into a temporary file
    beside `to` that `commit` renames to `to` (and `discard` removes)."""

    def __init__(self, limit: int, to: Path | None = None, ok: bool = True) -> None:
        self.limit, self.to, self.size, self.ok = limit, to, 0, ok
        self.memory = bytearray()
        self.file, self.part = None, None
        if to is not None:
            fd, name = tempfile.mkstemp(dir=to.parent, prefix=f".{to.name}.", suffix=".part")
            self.file, self.part = os.fdopen(fd, "wb"), Path(name)

    @classmethod
    def of(cls, resp: httpx.Response, limit: int, to: Path | None) -> _Body:
        """The body of this response: a success up to `limit` (refused at once when its declared
        length is more), into `to` when given; an error's first MAX_ERROR_BYTES, for its detail."""
        if not 200 <= resp.status_code < 300:
            return cls(MAX_ERROR_BYTES, ok=False)
        length = resp.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise AnswerError(502, f"the answer would be {length} bytes, more than the limit of {limit}")
        return cls(limit, to)

    def take(self, chunk: bytes) -> bool:
        """Add a chunk; True when an error's detail has all it reads (stop reading)."""
        if not self.ok and self.size + len(chunk) >= self.limit:
            self.write(chunk[: self.limit - self.size])
            return True
        self.write(chunk)
        return False

    def write(self, chunk: bytes) -> None:
        self.size = _counted(self.size, chunk, self.limit, "the answer")
        if self.file is not None:
            self.file.write(chunk)
        else:
            self.memory += chunk

    def data(self) -> bytes:
        if self.file is None:
            return bytes(self.memory)
        self.file.flush()
        return self.part.read_bytes()

    def text(self) -> str:
        return self.data()[:MAX_ERROR_BYTES].decode("utf-8", "replace")

    def check(self, fmt: str) -> None:
        """The body is the format asked for, whole: a PNG or GIF from its signature to its trailer,
        or JSON that parses to an object."""
        if fmt == "json":
            self.json()
            return
        data = self.data() if self.file is None else None
        if data is None:
            self.file.flush()
            with open(self.part, "rb") as f:
                first = f.read(16)
                f.seek(max(0, self.size - 16))
                last = f.read()
        else:
            first, last = data[:16], data[-16:]
        sig, trailer = SIGNATURES[fmt]
        if not first.startswith(sig):
            raise AnswerError(502, f"the answer is not a {fmt.upper()} (it starts {first[:8]!r})")
        if not last.endswith(trailer):
            raise AnswerError(502, f"the {fmt.upper()} answer is cut short ({self.size} bytes, no end marker)")

    def json(self) -> dict[str, Any]:
        try:
            value = json.loads(self.data().decode("utf-8"))  # JSON is UTF-8 (json.loads would guess UTF-16 too)
        except ValueError:
            raise AnswerError(502, f"the answer is not JSON ({self.size} bytes)") from None
        if not isinstance(value, dict):
            raise AnswerError(502, f"the answer is JSON but not an object ({type(value).__name__})")
        return value

    def commit(self) -> bytes | Path:
        if self.file is None:
            return bytes(self.memory)
        self.file.close()
        os.replace(self.part, self.to)
        self.part = None
        return self.to

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.part is not None:
            self.part.unlink(missing_ok=True)
            self.part = None
