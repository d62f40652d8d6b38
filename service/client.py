"""A Python client of the service, on httpx: one call per method, sync (`Client`) and async (`AsyncClient`).

    from service.client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as c:
        r = c.rollout("cat.png", head_fusion="mean")          # Explanation: r.mask (gh, gw) numpy, r.predictions
        png = c.rollout("cat.png", format="png")              # bytes; Client.image(png) -> PIL image
        many = c.grad_rollout(["cat.png", "dog.png"], category_id=243)   # one Explanation per image
        x = c.activation_max(category_id=281, steps=50, on_progress=print)
        r = c.gae("cat.png", category_id=281, faithfulness=True)   # r.faithfulness: curves and areas
        cmp = c.compare("cat.png", [{"method": "rollout"}, {"method": "gae", "params": {"category_id": 281}}])
        jpg = c.rollout("photo.jpg", format="jpeg", max_side=640)   # a picture answer, at most 640 px

Images may be paths, bytes (an encoded image), PIL images or numpy arrays (H, W[, 3]; uint8, or
floats in [0, 1]). Parameters left out take the service's defaults (GET /methods lists them).
One image goes as a raw body (the image's own content type, the parameters in the query string),
several as multipart.
503 answers are retried with backoff, honouring Retry-After (capped at `max_retry_after`); every
other error raises ServiceError with the service's `detail`. An answer is taken only when its
status, content type and body are what was asked for (a PNG or GIF whole from signature to end
marker, JSON that parses, events that parse), no larger than `max_answer_bytes` and whole within
the call's `deadline` (retries included); else AnswerError (a ServiceError, 502 or 504).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpcore
import httpx
import numpy as np
from PIL import Image

from schemas.media import MEDIA_TYPES

ImageLike = str | Path | bytes | Image.Image | np.ndarray
Images = ImageLike | Sequence[ImageLike]
Progress = Callable[[int, float], Any]  # (step, objective)


class ServiceError(RuntimeError):
    """The service answered with an error: `status` and its `detail`."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


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


class _Methods:
    """Every method of the service, once; `_send` (sync or async) does the HTTP."""

    def _call(self, path: str, images: Images | None, fmt: str, **params: Any):
        many = isinstance(images, (list, tuple))
        given = list(images) if many else ([] if images is None else [images])
        fields = _fields(params, "json" if many else fmt)
        return self._send(_Call(path, fields, [encode_image(i) for i in given], fields["format"], many))

    # The methods that answer maps also take the faithfulness option (docs/faithfulness.md):
    # faithfulness=True, faithfulness_steps, removal ("blur" | "mean"), order ("most" | "least").
    # Picture answers (format png, jpeg or webp) are drawn with their longest side at most max_side.
    def rollout(self, images: Images, *, head_fusion: str | None = None, discard_ratio: float | None = None,
                start_layer: int | None = None, max_side: int | None = None, model: str | None = None,
                format: str = "json", **faithfulness: Any):
        return self._call("/rollout", images, format, head_fusion=head_fusion, discard_ratio=discard_ratio,
                          start_layer=start_layer, max_side=max_side, model=model, **_faithful(faithfulness))

    def grad_rollout(self, images: Images, *, category_id: int, head_fusion: str | None = None,
                     discard_ratio: float | None = None, start_layer: int | None = None, max_side: int | None = None,
                     model: str | None = None, format: str = "json", **faithfulness: Any):
        return self._call("/grad-rollout", images, format, category_id=category_id, head_fusion=head_fusion,
                          discard_ratio=discard_ratio, start_layer=start_layer, max_side=max_side, model=model,
                          **_faithful(faithfulness))

    def gae(self, images: Images, *, category_id: int, start_layer: int | None = None, max_side: int | None = None,
            model: str | None = None, format: str = "json", **faithfulness: Any):
        return self._call("/gae", images, format, category_id=category_id, start_layer=start_layer, max_side=max_side,
                          model=model, **_faithful(faithfulness))

    def attention(self, images: Images, *, head: int | str | None = None, model: str | None = None,
                  format: str = "json"):
        return self._call("/attention", images, format, head=head, model=model)

    def qk(self, images: Images, *, layer: int | None = None, head: int | None = None, channel: int | None = None,
           which: Literal["q", "k"] | None = None, max_side: int | None = None, model: str | None = None,
           format: str = "json"):
        return self._call("/qk", images, format, layer=layer, head=head, channel=channel, which=which,
                          max_side=max_side, model=model)

    def rollout_sweep(self, images: Images, *, discard_ratios: Sequence[float] | None = None,
                      head_fusion: str | None = None, start_layer: int | None = None, frame_ms: int | None = None,
                      max_side: int | None = None, model: str | None = None, format: str = "json",
                      **faithfulness: Any):
        return self._call("/rollout/sweep", images, format, discard_ratios=discard_ratios, head_fusion=head_fusion,
                          start_layer=start_layer, frame_ms=frame_ms, max_side=max_side, model=model,
                          **_faithful(faithfulness))

    def grad_rollout_sweep(self, images: Images, *, category_id: int, discard_ratios: Sequence[float] | None = None,
                           head_fusion: str | None = None, start_layer: int | None = None,
                           frame_ms: int | None = None, max_side: int | None = None, model: str | None = None,
                           format: str = "json", **faithfulness: Any):
        return self._call("/grad-rollout/sweep", images, format, category_id=category_id,
                          discard_ratios=discard_ratios, head_fusion=head_fusion, start_layer=start_layer,
                          frame_ms=frame_ms, max_side=max_side, model=model, **_faithful(faithfulness))

    def compare(self, image: ImageLike, settings: Sequence[dict[str, Any]], *, faithfulness_steps: int | None = None,
                removal: str | None = None, order: str | None = None, model: str | None = None):
        """POST /compare: settings [{"method": "rollout", "params": {...}}, ...] -> Comparison."""
        fields = _fields(dict(faithfulness_steps=faithfulness_steps, removal=removal, order=order, model=model), "json")
        fields = {k: v for k, v in fields.items() if k != "format"} | {"settings": json.dumps(list(settings))}
        return self._send(_Call("/compare", fields, [encode_image(image)], "json", False, form=True,
                                parse=Comparison.of))

    def predict(self, images: Images, *, model: str | None = None):
        return self._call("/predict", images, "json", model=model)

    def activation_max(self, image: ImageLike | None = None, *, target: str | None = None,
                       category_id: int | None = None, layer: int | None = None, head: int | None = None,
                       channel: int | None = None, param: str | None = None, copies: int | None = None,
                       noise: float | None = None, steps: int | None = None, lr: float | None = None,
                       seed: int | None = None, l2_weight: float | None = None, jitter: int | None = None,
                       tv_weight: float | None = None, model: str | None = None,
                       on_progress: Progress | None = None):
        """-> Maximized (its raw answer has `robustness`, `final_objective` and `start_objective`). With
        on_progress(step, objective), the progress streams as server-sent events; the last event is
        the robustness pass after the last step (its objective: the finished picture's)."""
        params = dict(target=target, category_id=category_id, layer=layer, head=head, channel=channel, param=param,
                      copies=copies, noise=noise, steps=steps, lr=lr, seed=seed, l2_weight=l2_weight, jitter=jitter,
                      tv_weight=tv_weight, model=model)
        fields = _fields(params, "json")
        call = _Call("/activation-max", fields, [] if image is None else [encode_image(image)], "json", False,
                     parse=Maximized.of)
        return self._send(call) if on_progress is None else self._send_stream(call, on_progress)

    def request(self, path: str, image: ImageLike | None = None, *, format: str = "json", to: str | Path | None = None,
                on_progress: Progress | None = None, **params: Any):
        """Any method by its path, for one image (or none): -> the answer's bytes as they came (JSON text,
        PNG, GIF), checked to be what was asked for. With `to`, the answer streams into a temporary
        file beside it, renamed to `to` only when complete and checked (-> the path). With
        `on_progress(step, objective)` (long work, GET /methods' kind "long"), the progress streams as
        server-sent events and the result event's JSON answer comes back as its bytes. The command
        line uses it; the typed calls above are nicer to program with."""
        fields = _fields(params, format)
        images = [] if image is None else [encode_image(image)]
        if on_progress is not None:
            if format != "json" or to is not None:
                raise ValueError("a streamed answer is JSON, returned: give neither another format nor `to`")
            call = _Call(path, fields, images, "json", False, parse=_long_answer_bytes)
            return self._send_stream(call, on_progress)
        call = _Call(path, fields, images, format, False, raw=True)
        return self._send(call, None if to is None else Path(to))

    # -- parsing, shared ------------------------------------------------------------------------
    @staticmethod
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

    @staticmethod
    def image(data: bytes) -> Image.Image:
        """PNG (or GIF) bytes of an answer -> PIL image."""
        return Image.open(io.BytesIO(data))


SIGNATURES = {"png": (b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"), "apng": (b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"),
              "jpeg": (b"\xff\xd8\xff", b"\xff\xd9"), "webp": (b"RIFF", b""),
              "gif": (b"GIF8", b";")}
DEADLINE_S = 600.0  # longest a call may take, retries and their waits included
MAX_RETRY_AFTER_S = 30.0  # longest wait a Retry-After may ask for
MAX_ANSWER_BYTES = 512 * 1024 * 1024  # largest answer taken
MAX_ERROR_BYTES = 64 * 1024  # of an error answer, what is read for its detail


class AnswerError(ServiceError):
    """The answer is not what was asked for (502: a redirect, another content type, a body that is
    not a PNG/GIF/JSON or is cut short, too large, a broken event stream), or did not come whole
    within the call's deadline (504)."""


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


ANSWER_KEYS = ("mask", "masks", "layers", "map", "predictions", "results")  # an explanation has one at least
FAITHFULNESS_OPTIONS = ("faithfulness", "faithfulness_steps", "removal", "order")


def _faithful(options: dict[str, Any]) -> dict[str, Any]:
    """The faithfulness keywords of a map method's call; anything else is a TypeError, as for a typo."""
    unknown = sorted(set(options) - set(FAITHFULNESS_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    return options


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


# What an image's first bytes say it is -> the content type of a raw body (service/api/parsing.py)
_RAW_TYPES = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"GIF8", "image/gif"),
              (b"BM", "image/bmp"), (b"II*\0", "image/tiff"), (b"MM\0*", "image/tiff"))


def _raw_type(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
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


class _Events:
    """The server-sent events of activation maximization, line by line: progress calls back, the
    result ends the stream, an error raises ServiceError (504 for the request timeout). An event
    that is not the JSON it should be, a line or a stream past the size limit: AnswerError."""

    def __init__(self, call: _Call, on_progress: Progress, limit: int) -> None:
        self.call, self.on_progress, self.limit = call, on_progress, limit
        self.event: str | None = None
        self.result: Any = None
        self.pending = b""
        self.size = 0

    def feed_bytes(self, chunk: bytes) -> bool:
        """True once the result has come."""
        self.size = _counted(self.size, chunk, self.limit, "the event stream")
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        return any(self.feed(line.rstrip(b"\r").decode("utf-8", "replace")) for line in lines)

    def feed(self, line: str) -> bool:
        if line.startswith("event:"):
            self.event = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            try:
                data = json.loads(line.removeprefix("data:"))
            except ValueError:
                raise AnswerError(502, f"a {self.event} event's data is not JSON: {_excerpt(line, 80)!r}") from None
            if not isinstance(data, dict):
                raise AnswerError(502, f"a {self.event} event's data is not a JSON object")
            if self.event == "progress":
                step, value = data.get("step"), data.get("objective")
                if not isinstance(step, int) or not (value is None or isinstance(value, (int, float))):
                    raise AnswerError(502, f"a progress event without its step and objective: {_excerpt(line, 80)!r}")
                self.on_progress(step, value)
            elif self.event == "result":
                self.result = _answer(self.call, data)
                return True
            elif self.event == "error":
                detail = data.get("detail")
                raise ServiceError(504 if "longer than" in str(detail) else 500, detail)
        return False


class _Late(Exception):
    """The call's deadline passed while its answer was still coming."""


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


class _Retry:
    def __init__(self, retries: int, backoff: float, max_retry_after: float) -> None:
        self.retries, self.backoff, self.max_retry_after = retries, backoff, max_retry_after

    def delay(self, attempt: int, resp: httpx.Response | None) -> float | None:
        """Seconds to wait before the next attempt, or None to give up: a 503's Retry-After (capped at
        max_retry_after; not a finite number of seconds: the backoff), else the backoff, never past
        the call's deadline."""
        if attempt >= self.retries or (resp is not None and resp.status_code != 503):
            return None
        wait = self.backoff * 2**attempt
        after = resp.headers.get("retry-after") if resp is not None else None
        if after is not None:
            try:
                asked = float(after)
            except ValueError:
                asked = math.nan
            if math.isfinite(asked):
                wait = max(0.0, asked)
        wait = min(wait, self.max_retry_after)
        left = _left()
        return None if left is not None and wait >= left else wait


# -- the overall deadline of a call -------------------------------------------------------------------
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("client_deadline", default=None)


def _left() -> float | None:
    due = _deadline.get()
    return None if due is None else due - time.monotonic()


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write waits at most until the call's deadline: httpx's
    timeouts are per read, so a server dripping a byte at a time could otherwise stretch a call
    forever."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _clip(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _clip(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):  # noqa: ANN001, ANN201
        tls = self._stream.start_tls(ssl_context, server_hostname, _clip(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(tls)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._backend = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):  # noqa: ANN001, ANN201
        return _DeadlineStream(self._backend.connect_tcp(host, port, _clip(timeout, httpcore.ConnectTimeout),
                                                         local_address, socket_options))

    def connect_unix_socket(self, path, timeout=None, socket_options=None):  # noqa: ANN001, ANN201
        return _DeadlineStream(self._backend.connect_unix_socket(path, _clip(timeout, httpcore.ConnectTimeout),
                                                                 socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def _clip(timeout: float | None, error: type[Exception]) -> float | None:
    left = _left()
    if left is None:
        return timeout
    if left <= 0:
        raise error("the call's deadline has passed")
    return left if timeout is None else min(timeout, left)


def _deadline_transport() -> httpx.HTTPTransport:
    """httpx's own transport on connections that keep the call's deadline (see _DeadlineStream)."""
    transport = httpx.HTTPTransport()
    transport._pool = httpcore.ConnectionPool(ssl_context=transport._pool._ssl_context,
                                              network_backend=_DeadlineBackend())
    return transport


def _late(deadline: float) -> AnswerError:
    return AnswerError(504, f"no complete answer within the deadline of {deadline:g} s")


def _transport_failure(e: httpx.TransportError) -> Exception:
    """A connection that could not be made stays what it is (the CLI: cannot reach); one that
    broke or spoke nonsense once made is an answer that did not come whole."""
    if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol)):
        return e
    return AnswerError(502, f"the answer did not come whole: {type(e).__name__}: {_excerpt(str(e))}")


def _headers(api_key: str | None) -> dict[str, str]:
    return {"X-API-Key": api_key} if api_key else {}


class Client(_Methods):
    """Synchronous client. `retries`: attempts after the first on 503 or a failed connection.
    `timeout`: longest wait for each piece of an answer; `deadline`: longest a whole call may take
    (retries included); `max_answer_bytes`: the largest answer taken."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 0.5, deadline: float = DEADLINE_S,
                 max_retry_after: float = MAX_RETRY_AFTER_S, max_answer_bytes: int = MAX_ANSWER_BYTES,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=url, timeout=timeout, headers=_headers(api_key),
                                  transport=transport or _deadline_transport())
        self._retry = _Retry(retries, backoff, max_retry_after)
        self.deadline, self.max_answer_bytes = deadline, max_answer_bytes

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def methods(self) -> list[dict]:
        return self._get_json("/methods")

    def models(self) -> list[dict]:
        return self._get_json("/models")

    def _get_json(self, path: str):
        return self._exchange(("GET", path, {}), _Call(path, {}, [], "json", False), None, _get)

    def _send(self, call: _Call, to: Path | None = None):
        return self._exchange(("POST", call.path, _request_args(call)), call, to, self._parse)

    def _send_stream(self, call: _Call, on_progress: Progress):
        def events(call: _Call, resp: httpx.Response, body: _Body):
            _check_stream(resp, body)
            ev = _Events(call, on_progress, self.max_answer_bytes)
            for chunk in resp.iter_bytes():
                if ev.feed_bytes(chunk):
                    return ev.result
            raise AnswerError(502, "the stream ended without a result")

        return self._exchange(("POST", call.path, _request_args(call, accept="text/event-stream")),
                              call, None, events, stream=True)

    def _exchange(self, request: tuple, call: _Call, to: Path | None, answer, stream: bool = False):
        """Send with retries (503, failed connections) within the deadline; read the body (bounded,
        into `to` when given) and hand it to `answer(call, resp, body)`."""
        method, path, kwargs = request
        token = _deadline.set(time.monotonic() + self.deadline)
        attempt = 0
        try:
            while True:
                try:
                    with self._http.stream(method, path, **kwargs) as resp:
                        wait = self._retry.delay(attempt, resp)
                        if wait is None:
                            body = _Body.of(resp, self.max_answer_bytes, to)
                            try:
                                if not (stream and body.ok):
                                    for chunk in resp.iter_bytes():
                                        if body.take(chunk):
                                            break
                                return answer(call, resp, body)
                            finally:
                                body.discard()
                except httpx.DecodingError as e:  # a Content-Encoding that does not decode
                    raise AnswerError(502, f"the answer's body does not decode: {_excerpt(str(e))}") from None
                except httpx.TransportError as e:
                    if _left() <= 0:
                        raise _Late() from None
                    wait = self._retry.delay(attempt, None)
                    if wait is None:
                        raise _transport_failure(e) from None
                time.sleep(wait)
                attempt += 1
        except _Late:
            raise _late(self.deadline) from None
        finally:
            _deadline.reset(token)


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


class AsyncClient(_Methods):
    """Asynchronous client: the same calls, awaited, with the same deadline and limits."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 0.5, deadline: float = DEADLINE_S,
                 max_retry_after: float = MAX_RETRY_AFTER_S, max_answer_bytes: int = MAX_ANSWER_BYTES,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._http = httpx.AsyncClient(base_url=url, timeout=timeout, headers=_headers(api_key), transport=transport)
        self._retry = _Retry(retries, backoff, max_retry_after)
        self.deadline, self.max_answer_bytes = deadline, max_answer_bytes

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def methods(self) -> list[dict]:
        return await self._get_json("/methods")

    async def models(self) -> list[dict]:
        return await self._get_json("/models")

    async def _get_json(self, path: str):
        return await self._exchange(("GET", path, {}), _Call(path, {}, [], "json", False), None, _get)

    async def _send(self, call: _Call, to: Path | None = None):
        return await self._exchange(("POST", call.path, _request_args(call)), call, to, self._parse)

    async def _send_stream(self, call: _Call, on_progress: Progress):
        return await self._exchange(("POST", call.path, _request_args(call, accept="text/event-stream")),
                                    call, None, None, on_progress=on_progress)

    async def _exchange(self, request: tuple, call: _Call, to: Path | None, answer,
                        on_progress: Progress | None = None):
        method, path, kwargs = request
        token = _deadline.set(time.monotonic() + self.deadline)
        attempt = 0
        try:
            async with asyncio.timeout(self.deadline):
                while True:
                    try:
                        async with self._http.stream(method, path, **kwargs) as resp:
                            wait = self._retry.delay(attempt, resp)
                            if wait is None:
                                body = _Body.of(resp, self.max_answer_bytes, to)
                                try:
                                    if on_progress is not None and body.ok:
                                        _check_stream(resp, body)
                                        ev = _Events(call, on_progress, self.max_answer_bytes)
                                        async for chunk in resp.aiter_bytes():
                                            if ev.feed_bytes(chunk):
                                                return ev.result
                                        raise AnswerError(502, "the stream ended without a result")
                                    async for chunk in resp.aiter_bytes():
                                        if body.take(chunk):
                                            break
                                    if on_progress is not None:
                                        _check_status(resp, body)
                                    return answer(call, resp, body)
                                finally:
                                    body.discard()
                    except httpx.DecodingError as e:
                        raise AnswerError(502, f"the answer's body does not decode: {_excerpt(str(e))}") from None
                    except httpx.TransportError as e:
                        wait = self._retry.delay(attempt, None)
                        if wait is None:
                            raise _transport_failure(e) from None
                    await asyncio.sleep(wait)
                    attempt += 1
        except (_Late, TimeoutError):
            raise _late(self.deadline) from None
        finally:
            _deadline.reset(token)
