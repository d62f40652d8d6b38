"""A Python client of the service, on httpx: one call per method, sync (`Client`) and async (`AsyncClient`).

    from service.client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as c:
        r = c.rollout("cat.png", head_fusion="mean")          # Explanation: r.mask (gh, gw) numpy, r.predictions
        png = c.rollout("cat.png", format="png")              # bytes; Client.image(png) -> PIL image
        many = c.grad_rollout(["cat.png", "dog.png"], category_id=243)   # one Explanation per image
        x = c.activation_max(category_id=281, steps=50, on_progress=print)
        r = c.gae("cat.png", category_id=281, faithfulness=True)   # r.faithfulness: curves and areas
        cmp = c.compare("cat.png", [{"method": "rollout"}, {"method": "gae", "params": {"category_id": 281}}])

Images may be paths, bytes (an encoded image), PIL images or numpy arrays (H, W[, 3]; uint8, or
floats in [0, 1]). Parameters left out take the service's defaults (GET /methods lists them).
503 answers are retried with backoff, honouring Retry-After; every other error raises
ServiceError with the service's `detail`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import httpx
import numpy as np
from PIL import Image

ImageLike = Union[str, Path, bytes, Image.Image, np.ndarray]
Images = Union[ImageLike, Sequence[ImageLike]]
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
    def of(cls, raw: dict[str, Any]) -> "Explanation":
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
    def of(cls, raw: dict[str, Any]) -> "Comparison":
        return cls(raw=raw, results=raw["results"], masks=np.asarray([r["mask"] for r in raw["results"]], np.float32),
                   ranking=raw["ranking"], predictions=raw.get("predictions", []))


@dataclass
class Maximized:
    """Activation maximization's answer: the image (PIL, at the model's input size) and the objective per step."""

    image: Image.Image
    objective: list[float]
    raw: dict[str, Any]


@dataclass(frozen=True)
class _Call:
    path: str
    fields: dict[str, str]
    images: list[tuple[str, bytes]]
    format: str
    many: bool  # a list of images was given: answer a list
    raw: bool = False  # answer the body's bytes as they came


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

    # The methods that answer maps also take the faithfulness option (README "Faithfulness"):
    # faithfulness=True, faithfulness_steps, removal ("blur" | "mean"), order ("most" | "least").
    def rollout(self, images: Images, *, head_fusion: str | None = None, discard_ratio: float | None = None,
                start_layer: int | None = None, model: str | None = None, format: str = "json",
                **faithfulness: Any):
        return self._call("/rollout", images, format, head_fusion=head_fusion, discard_ratio=discard_ratio,
                          start_layer=start_layer, model=model, **_faithful(faithfulness))

    def grad_rollout(self, images: Images, *, category_id: int, head_fusion: str | None = None,
                     discard_ratio: float | None = None, start_layer: int | None = None, model: str | None = None,
                     format: str = "json", **faithfulness: Any):
        return self._call("/grad-rollout", images, format, category_id=category_id, head_fusion=head_fusion,
                          discard_ratio=discard_ratio, start_layer=start_layer, model=model, **_faithful(faithfulness))

    def gae(self, images: Images, *, category_id: int, start_layer: int | None = None, model: str | None = None,
            format: str = "json", **faithfulness: Any):
        return self._call("/gae", images, format, category_id=category_id, start_layer=start_layer, model=model,
                          **_faithful(faithfulness))

    def attention(self, images: Images, *, head: int | str | None = None, model: str | None = None,
                  format: str = "json"):
        return self._call("/attention", images, format, head=head, model=model)

    def qk(self, images: Images, *, layer: int | None = None, head: int | None = None, channel: int | None = None,
           which: Literal["q", "k"] | None = None, model: str | None = None, format: str = "json"):
        return self._call("/qk", images, format, layer=layer, head=head, channel=channel, which=which, model=model)

    def rollout_sweep(self, images: Images, *, discard_ratios: Sequence[float] | None = None,
                      head_fusion: str | None = None, start_layer: int | None = None, frame_ms: int | None = None,
                      model: str | None = None, format: str = "json", **faithfulness: Any):
        return self._call("/rollout/sweep", images, format, discard_ratios=discard_ratios, head_fusion=head_fusion,
                          start_layer=start_layer, frame_ms=frame_ms, model=model, **_faithful(faithfulness))

    def grad_rollout_sweep(self, images: Images, *, category_id: int, discard_ratios: Sequence[float] | None = None,
                           head_fusion: str | None = None, start_layer: int | None = None,
                           frame_ms: int | None = None, model: str | None = None, format: str = "json",
                           **faithfulness: Any):
        return self._call("/grad-rollout/sweep", images, format, category_id=category_id,
                          discard_ratios=discard_ratios, head_fusion=head_fusion, start_layer=start_layer,
                          frame_ms=frame_ms, model=model, **_faithful(faithfulness))

    def compare(self, image: ImageLike, settings: Sequence[dict[str, Any]], *, faithfulness_steps: int | None = None,
                removal: str | None = None, order: str | None = None, model: str | None = None):
        """POST /compare: settings [{"method": "rollout", "params": {...}}, ...] -> Comparison."""
        fields = _fields(dict(faithfulness_steps=faithfulness_steps, removal=removal, order=order, model=model), "json")
        fields = {k: v for k, v in fields.items() if k != "format"} | {"settings": json.dumps(list(settings))}
        return self._send(_Call("/compare", fields, [encode_image(image)], "json", False))

    def predict(self, images: Images, *, model: str | None = None):
        return self._call("/predict", images, "json", model=model)

    def activation_max(self, image: ImageLike | None = None, *, target: str | None = None,
                       category_id: int | None = None, layer: int | None = None, head: int | None = None,
                       channel: int | None = None, steps: int | None = None, lr: float | None = None,
                       seed: int | None = None, l2_weight: float | None = None, jitter: int | None = None,
                       tv_weight: float | None = None, model: str | None = None,
                       on_progress: Progress | None = None):
        """-> Maximized. With on_progress(step, objective), the progress streams as server-sent events."""
        params = dict(target=target, category_id=category_id, layer=layer, head=head, channel=channel, steps=steps,
                      lr=lr, seed=seed, l2_weight=l2_weight, jitter=jitter, tv_weight=tv_weight, model=model)
        fields = _fields(params, "json")
        call = _Call("/activation-max", fields, [] if image is None else [encode_image(image)], "json", False)
        return self._send(call) if on_progress is None else self._send_stream(call, on_progress)

    def request(self, path: str, image: ImageLike | None = None, *, format: str = "json", **params: Any):
        """Any method by its path, for one image (or none): -> the answer's bytes as they came (JSON text,
        PNG, GIF). The command line uses it; the typed calls above are nicer to program with."""
        fields = _fields(params, format)
        return self._send(_Call(path, fields, [] if image is None else [encode_image(image)], format, False, raw=True))

    # -- parsing, shared ------------------------------------------------------------------------
    @staticmethod
    def _parse(call: _Call, resp: httpx.Response):
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            raise ServiceError(resp.status_code, detail)
        if call.format != "json" or call.raw:
            return resp.content
        return _answer(call, resp.json())

    @staticmethod
    def image(data: bytes) -> Image.Image:
        """PNG (or GIF) bytes of an answer -> PIL image."""
        return Image.open(io.BytesIO(data))


FAITHFULNESS_OPTIONS = ("faithfulness", "faithfulness_steps", "removal", "order")


def _faithful(options: dict[str, Any]) -> dict[str, Any]:
    """The faithfulness keywords of a map method's call; anything else is a TypeError, as for a typo."""
    unknown = sorted(set(options) - set(FAITHFULNESS_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    return options


def _answer(call: _Call, body: dict[str, Any]):
    if call.path == "/compare":
        return Comparison.of(body)
    if call.path == "/activation-max":
        img = Image.open(io.BytesIO(base64.b64decode(body["image"])))
        return Maximized(image=img, objective=body["objective"], raw=body)
    if call.many:
        return [Explanation.of(r) for r in body["results"]] if "results" in body else [Explanation.of(body)]
    return Explanation.of(body)


def _request_args(call: _Call) -> dict[str, Any]:
    if call.images:
        return {"data": call.fields, "files": [("image", (name, data)) for name, data in call.images]}
    return {"json": {k: _json_value(v) for k, v in call.fields.items()}}


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
    result ends the stream, an error raises ServiceError (504 for the request timeout)."""

    def __init__(self, call: _Call, on_progress: Progress) -> None:
        self.call, self.on_progress = call, on_progress
        self.event: str | None = None
        self.result: Any = None

    def feed(self, line: str) -> bool:
        """True once the result has come."""
        if line.startswith("event: "):
            self.event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = json.loads(line.removeprefix("data: "))
            if self.event == "progress":
                self.on_progress(data["step"], data["objective"])
            elif self.event == "result":
                self.result = _answer(self.call, data)
                return True
            elif self.event == "error":
                detail = data.get("detail")
                raise ServiceError(504 if "longer than" in str(detail) else 500, detail)
        return False


class _Retry:
    def __init__(self, retries: int, backoff: float) -> None:
        self.retries, self.backoff = retries, backoff

    def delay(self, attempt: int, resp: httpx.Response | None) -> float | None:
        """Seconds to wait before the next attempt, or None to give up."""
        if attempt >= self.retries or (resp is not None and resp.status_code != 503):
            return None
        after = resp.headers.get("retry-after") if resp is not None else None
        try:
            return max(0.0, float(after)) if after is not None else self.backoff * 2**attempt
        except ValueError:
            return self.backoff * 2**attempt


def _headers(api_key: str | None) -> dict[str, str]:
    return {"X-API-Key": api_key} if api_key else {}


class Client(_Methods):
    """Synchronous client. `retries`: attempts after the first on 503 or a failed connection."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 0.5, transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=url, timeout=timeout, headers=_headers(api_key), transport=transport)
        self._retry = _Retry(retries, backoff)

    def __enter__(self) -> "Client":
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
        resp = self._with_retries(lambda: self._http.get(path))
        if resp.status_code >= 400:
            self._parse(_Call(path, {}, [], "json", False), resp)
        return resp.json()

    def _with_retries(self, send: Callable[[], httpx.Response]) -> httpx.Response:
        attempt = 0
        while True:
            try:
                resp = send()
            except httpx.TransportError:
                wait = self._retry.delay(attempt, None)
                if wait is None:
                    raise
            else:
                wait = self._retry.delay(attempt, resp)
                if wait is None:
                    return resp
            time.sleep(wait)
            attempt += 1

    def _send(self, call: _Call):
        return self._parse(call, self._with_retries(lambda: self._http.post(call.path, **_request_args(call))))

    def _send_stream(self, call: _Call, on_progress: Progress):
        headers = {"Accept": "text/event-stream"}
        with self._http.stream("POST", call.path, headers=headers, **_request_args(call)) as resp:
            if resp.status_code >= 400:
                resp.read()
                self._parse(call, resp)
            events = _Events(call, on_progress)
            for line in resp.iter_lines():
                if events.feed(line):
                    return events.result
        raise ServiceError(502, "the stream ended without a result")


class AsyncClient(_Methods):
    """Asynchronous client: the same calls, awaited."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 0.5, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._http = httpx.AsyncClient(base_url=url, timeout=timeout, headers=_headers(api_key), transport=transport)
        self._retry = _Retry(retries, backoff)

    async def __aenter__(self) -> "AsyncClient":
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
        resp = await self._with_retries(lambda: self._http.get(path))
        if resp.status_code >= 400:
            self._parse(_Call(path, {}, [], "json", False), resp)
        return resp.json()

    async def _with_retries(self, send) -> httpx.Response:
        attempt = 0
        while True:
            try:
                resp = await send()
            except httpx.TransportError:
                wait = self._retry.delay(attempt, None)
                if wait is None:
                    raise
            else:
                wait = self._retry.delay(attempt, resp)
                if wait is None:
                    return resp
            await asyncio.sleep(wait)
            attempt += 1

    async def _send(self, call: _Call):
        return self._parse(call, await self._with_retries(lambda: self._http.post(call.path, **_request_args(call))))

    async def _send_stream(self, call: _Call, on_progress: Progress):
        headers = {"Accept": "text/event-stream"}
        async with self._http.stream("POST", call.path, headers=headers, **_request_args(call)) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                self._parse(call, resp)
            events = _Events(call, on_progress)
            async for line in resp.aiter_lines():
                if events.feed(line):
                    return events.result
        raise ServiceError(502, "the stream ended without a result")
