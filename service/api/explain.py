"""The explanation endpoints: one route per registered method (service/methods/), by its kind:

    one-pass  parse -> check against the model -> decode -> queue -> engine -> encode   (`explain`)
    long      parse -> check -> decode -> a loop of background steps that answers at the end,
              or streams its progress as server-sent events                          (`long_work`)
"""

from __future__ import annotations

import asyncio
import json
import math
import weakref
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from schemas import responses as rs
from schemas.media import MEDIA_TYPES
from service import budget, imaging
from service.api.admission import admission_for
from service.api.deps import AppContext, ContextDep
from service.api.echoes import header_safe
from service.api.parsing import RAW_TYPES, admit_images, read_request
from service.engine.contract import Job, Result
from service.methods import REGISTRY, LongMethod, Method, OnePassMethod
from service.pool import ServedModel

router = APIRouter(tags=["explain"])


class NumpyJSON(Response):
    """A JSON answer written by orjson straight from numpy arrays (the masks), no Python floats in
    between. FastAPI's own ORJSONResponse is deprecated in favour of return types that
    Pydantic serializes, which would turn each map into a list of floats first."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)


class ClientGone(Exception):
    """The caller disconnected before its answer was ready; its work was dropped."""


# -- stages -----------------------------------------------------------------------------------
def _decode_all(ctx: AppContext, target: imaging.Target, blobs: list[bytes]) -> list[imaging.Decoded]:
    """Bytes -> each upload at the model's input size (uint8) and its canvas; errors name the image."""
    out = []
    for i, data in enumerate(blobs):
        try:
            out.append(imaging.prepare(data, ctx.settings.max_pixels, target))
        except imaging.ImageError as e:
            if len(blobs) > 1:
                raise type(e)(f"image {i}: {e}") from None
            raise
    return out


async def _until_disconnect(request: Request) -> None:
    while not await request.is_disconnected():  # noqa: ASYNC110 - Starlette offers no disconnect event to wait on
        await asyncio.sleep(0.2)


async def _unless_gone(request: Request, work: asyncio.Future) -> Any:
    """The result of `work`, or ClientGone (and `work` cancelled) when the client disconnects first."""
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise ClientGone("the client disconnected")
        return work.result()
    finally:
        work.cancel()  # a cancelled submit drops its item from the queue before it is computed
        work.add_done_callback(_retrieved)
        watcher.cancel()


def _retrieved(f: asyncio.Future) -> None:
    """Mark the outcome of work no one awaits any more as seen (a cancelled gather ends with an exception
    that asyncio would otherwise log as never retrieved)."""
    if not f.cancelled():
        f.exception()


async def _compute(ctx: AppContext, request: Request, served: ServedModel, job: Job, blobs: list[bytes],
                   target: imaging.Target):
    job = replace(job, stop=budget.stop_signal())  # the engine stops the job's work when the request ends
    with served.batcher.arriving(len(blobs)):  # a free worker waits for these rather than start without them
        decoded = await run_in_threadpool(_decode_all, ctx, target, blobs)
        submits = [asyncio.ensure_future(served.batcher.submit((d.encoded if d.pixels is None else d.pixels, job)))
                   for d in decoded]
    try:
        results = await _unless_gone(request, asyncio.gather(*(_named(i, t, len(submits)) for i, t in
                                                               enumerate(submits))))
    finally:
        for t in submits:
            t.cancel()
    return [d.canvas for d in decoded], results


async def _named(i: int, submit: asyncio.Future, n: int) -> Result:
    """An image's result; an image error found in the batch (a JPEG decoded on the device) names
    the image among several, as the CPU path's decoding does (`_decode_all`)."""
    try:
        return await submit
    except imaging.ImageError as e:
        if n > 1:
            raise type(e)(f"image {i}: {e}") from None
        raise


def _accepted(method: Method, ctx: AppContext, params: BaseModel) -> ServedModel:
    """The model the request names, once the parameters are checked against it (404, 503, 422)."""
    served = ctx.pool.get(params.model)
    method.check(params, served.shape)
    return served


async def explain(request: Request, ctx: AppContext, method: OnePassMethod) -> Response:
    params, blobs = await read_request(request, method.Params, method.images_per_request(ctx.settings.max_images),
                                       image_required=method.image == "required")
    served = _accepted(method, ctx, params)
    shape = served.shape
    # several images are answered as JSON: only a single image's answer may draw a picture
    canvas = method.canvas(params) if len(blobs) == 1 else None
    target = served.preprocess.target(canvas, keep_jpeg=ctx.settings.decode_on_device)
    await admit_images(request, blobs, target, method.frames(params), method.forwards(params))
    async with asyncio.timeout(ctx.settings.request_timeout_s):
        images, results = await _compute(ctx, request, served, method.job(params), blobs, target)
    if len(results) > 1:
        return NumpyJSON({"model": served.name, "results": [method.to_json(params, r, shape) for r in results]})
    (img,), (result,) = images, results
    if getattr(params, "format", "json") == "json":
        return NumpyJSON(method.to_json(params, result, shape))
    body, media = await run_in_threadpool(method.render, params, img, result, shape)
    return Response(body, media_type=media, headers=_prediction_headers(served, result))


def _prediction_headers(served: ServedModel, result: Result) -> dict[str, str]:
    """Headers carry text made header-safe (percent-encoded); the JSON answers keep it as it is."""
    if not result.predictions:
        return {"X-Model": header_safe(served.name)}
    top = result.predictions[0]
    headers = {
        "X-Model": header_safe(served.name),
        "X-Predicted-Class": str(top.class_id),
        "X-Predicted-Label": header_safe(served.labels[top.class_id]),
        "X-Predicted-Score": f"{top.score:.6f}",
    }
    return headers | _faithfulness_headers(result)


FAITHFULNESS_HEADERS = ("X-Faithfulness-Class", "X-Deletion-AUC", "X-Insertion-AUC")


def _faithfulness_headers(result: Result) -> dict[str, str]:
    """The areas of the scored maps, one per map (a sweep's frames comma-separated, in order)."""
    if not result.faithfulness:
        return {}
    curves = result.faithfulness
    return dict(zip(FAITHFULNESS_HEADERS, (
        ",".join(str(c.class_id) for c in curves),
        ",".join(f"{c.deletion_auc:.6f}" for c in curves),
        ",".join(f"{c.insertion_auc:.6f}" for c in curves),
    )))


# -- long work --------------------------------------------------------------------------------
async def long_work(request: Request, ctx: AppContext, method: LongMethod) -> Response:
    """`method.steps(params)` background steps, batched with the other sessions of the model.

    With `Accept: text/event-stream` the answer streams `progress` events ({"step", "total", "objective"})
    as the steps run, then one `result` event (the JSON answer) or one `error` event ({"status", "detail"}:
    the status the answer would have had, 504 for the request timeout, and why).
    """
    params, blobs = await read_request(request, method.Params, method.images_per_request(ctx.settings.max_images),
                                       image_required=method.image == "required")
    served = _accepted(method, ctx, params)
    close = served.batcher.open_session(ctx.settings.max_maximizations)  # 503 past the limit, taken at once
    try:
        response = await _long_work(request, ctx, method, params, blobs, served, close)
    except BaseException:
        close()
        raise
    if not isinstance(response, StreamingResponse):
        close()  # a stream closes its session itself, when it ends (see _long_work)
    return response


async def _long_work(request: Request, ctx: AppContext, method: LongMethod, params, blobs, served: ServedModel,
                     close) -> Response:
    shape = served.shape
    start = None
    if blobs:
        target = served.preprocess.target()
        await admit_images(request, blobs, target)
        [decoded] = await run_in_threadpool(_decode_all, ctx, target, blobs)
        start = decoded.pixels  # the upload at the input size, uint8 (H, W, 3)
    # the pictures its steps hold at once (e.g. transformed copies), at the input size, from the shared budget
    await admission_for(request.app).take_pixels(method.frames(params) * shape.input_size[0] * shape.input_size[1])
    state, job = method.start(params, start, shape), method.job(params)
    deadline = asyncio.get_running_loop().time() + ctx.settings.request_timeout_s

    total = method.steps(params)

    async def steps() -> AsyncIterator[tuple[int, int, float]]:
        for step in range(total):
            async with asyncio.timeout_at(deadline):
                value = await served.batcher.submit((state, job), background=True)
            yield step, total, value

    if "text/event-stream" in request.headers.get("accept", ""):
        events = _events(ctx, method, params, state, steps(), shape, close)
        # The session stays open while the stream runs, and closes when it ends, fails or is
        # cancelled; a stream that never starts (its client gone first) closes it when collected.
        weakref.finalize(events, close)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Model": header_safe(served.name)})

    async def run() -> None:
        async for _ in steps():
            pass

    await _unless_gone(request, asyncio.ensure_future(run()))
    result = method.result(params, state)
    if params.format == "json":
        return NumpyJSON(method.to_json(params, result, shape))
    body, media = await run_in_threadpool(method.render, params, None, result, shape)
    return Response(body, media_type=media, headers=_prediction_headers(served, result))


async def _events(ctx: AppContext, method: LongMethod, params, state, steps: AsyncIterator[tuple[int, int, float]],
                  shape, close):
    """Server-sent events of long work. A client that leaves cancels this generator, and with
    it the step it waits for (Starlette cancels the response when the client disconnects)."""
    try:
        async for step, total, value in steps:
            yield _sse("progress", {"step": step, "total": total, "objective": value if math.isfinite(value) else None})
        answer = await run_in_threadpool(method.to_json, params, method.result(params, state), shape)
        yield _sse("result", answer)
    except TimeoutError:
        yield _sse("error", {"status": 504,
                             "detail": f"the request took longer than {ctx.settings.request_timeout_s:g} s"})
    except Exception as e:  # noqa: BLE001 - the status line is sent: report the failure in the stream
        yield _sse("error", {"status": 500, "detail": str(e) or type(e).__name__})
    finally:
        close()


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, allow_nan=False, default=str)}\n\n"


# -- OpenAPI: the bodies are parsed by hand (multipart or JSON), so describe them here ----------
def _schema(model: type[BaseModel]) -> dict:
    """The model's JSON schema with its $defs inlined: an operation's schema cannot refer to them."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


def _body(method: Method) -> dict:
    schema = _schema(method.Params)
    props, required = schema.get("properties", {}), schema.get("required", [])
    need = ["image", *required] if method.image == "required" else required
    many = {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}
    b64 = {"anyOf": [{"type": "string", "contentEncoding": "base64"},
                     {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}, "minItems": 1}]}
    content = {
        "multipart/form-data": {"schema": {"type": "object", "properties": {"image": many, **props}, "required": need}},
        "application/json": {"schema": {"type": "object", "properties": {"image": b64, **props}, "required": need,
                                        "additionalProperties": False}},
        **{ctype: {"schema": {"type": "string", "format": "binary"}} for ctype in sorted(RAW_TYPES)},
    }
    # With a raw image body (and only then) the parameters come in the query string.
    query = [{"name": name, "in": "query", "required": name in required, "schema": prop,
              "description": f"{prop.get('description', '')} (only with a raw image body)".strip()}
             for name, prop in props.items()]
    ok: dict = {"application/json": {"schema": {"anyOf": [_schema(method.Response), _schema(rs.MultiResponse)]}}}
    for fmt in method.formats:
        if fmt != "json":
            ok[MEDIA_TYPES[fmt]] = {"schema": {"type": "string", "format": "binary"}}
    if method.kind == "long":
        ok["text/event-stream"] = {"schema": {"type": "string"}}
    return {
        "parameters": query,
        "requestBody": {"required": True, "content": content},
        "responses": {"200": {"description": "the explanation; JSON with one result per image for several images",
                              "content": ok}},
    }


HANDLERS = {"one-pass": explain, "long": long_work}  # by the method's declared kind


def _route(method: Method) -> None:
    handler = HANDLERS[method.kind]

    async def endpoint(request: Request, ctx: ContextDep) -> Response:
        return await handler(request, ctx, method)

    endpoint.__name__ = method.name.replace("-", "_")
    router.add_api_route(
        method.route, endpoint, methods=["POST"], summary=method.summary, openapi_extra=_body(method),
        responses={code: {"model": rs.Error} for code in (400, 401, 404, 413, 415, 422, 503, 504)},
    )


for _method in REGISTRY.values():
    _route(_method)


@router.get("/methods", response_model=list[rs.MethodInfo], tags=["service"],
            summary="Every explanation method: its endpoint, parameters with defaults and ranges, formats")
async def list_methods(ctx: ContextDep) -> list[rs.MethodInfo]:
    return [m.info(ctx.settings.max_images) for m in REGISTRY.values()]
