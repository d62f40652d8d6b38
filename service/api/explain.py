"""The explanation endpoints: thin routes over parse -> decode -> queue -> engine -> encode.

Each endpoint is described once by a Method: its parameters, the engine job they ask for, how a
result becomes JSON and how it is drawn as a PNG. `explain` runs the shared stages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from schemas import requests as rq
from schemas import responses as rs
from service import imaging
from service.api.deps import Ctx, InvalidParams, get_ctx
from service.api.parsing import read_request
from service.engine.jobs import QK, GradRollout, Job, LayerAttention, Predict, Result, Rollout
from service.pool import ServedModel

router = APIRouter(tags=["explain"])


class ClientGone(Exception):
    """The caller disconnected before its answer was ready; its work was dropped."""


@dataclass(frozen=True)
class Method:
    name: str
    params: type[rq._Params]
    job: Callable[[Any], Job]
    to_json: Callable[[ServedModel, dict, Result], dict]
    draw: Callable[[Image.Image, Result], np.ndarray] | None  # None: JSON only


def _predictions(served: ServedModel, result: Result) -> list[dict]:
    return [{"class_id": p.class_id, "label": served.labels[p.class_id], "score": p.score} for p in result.predictions]


def _mask_json(method: str):
    def to_json(served: ServedModel, params: dict, r: Result) -> dict:
        return {"model": served.name, "method": method, "params": params, "grid": served.engine.grid,
                "mask": r.maps.tolist(), "predictions": _predictions(served, r)}

    return to_json


ROLLOUT = Method(
    "rollout", rq.RolloutParams,
    lambda p: Rollout(head_fusion=p.head_fusion, discard_ratio=p.discard_ratio),
    _mask_json("rollout"), lambda img, r: imaging.overlay(img, r.maps),
)
GRAD_ROLLOUT = Method(
    "grad-rollout", rq.GradRolloutParams,
    lambda p: GradRollout(category_id=p.category_id, head_fusion=p.head_fusion, discard_ratio=p.discard_ratio),
    _mask_json("grad-rollout"), lambda img, r: imaging.overlay(img, r.maps),
)
ATTENTION = Method(
    "attention", rq.AttentionParams, lambda p: LayerAttention(head=p.head),
    lambda s, params, r: {"model": s.name, "params": params, "grid": s.engine.grid, "layers": r.maps.tolist()},
    lambda img, r: imaging.montage(img, r.maps),
)
QK_IMAGE = Method(
    "qk", rq.QKParams, lambda p: QK(layer=p.layer, head=p.head, channel=p.channel, which=p.which),
    lambda s, params, r: {"model": s.name, "params": params, "grid": s.engine.grid, "map": r.maps.tolist()},
    lambda img, r: imaging.grayscale(r.maps, img.size),
)
PREDICT = Method(
    "predict", rq.PredictParams, lambda p: Predict(),
    lambda s, params, r: {"model": s.name, "predictions": _predictions(s, r)}, None,
)


# -- stages -----------------------------------------------------------------------------------
def _check(job: Job, served: ServedModel) -> None:
    """Model-dependent ranges; the schemas have checked the rest."""
    e = served.engine
    if isinstance(job, GradRollout) and job.category_id >= len(served.labels):
        raise InvalidParams("category_id", f"must be < {len(served.labels)} (model {served.name!r} has {len(served.labels)} classes)")
    if isinstance(job, (LayerAttention, QK)) and isinstance(job.head, int) and job.head >= e.num_heads:
        raise InvalidParams("head", f"must be < {e.num_heads} (model {served.name!r} has {e.num_heads} heads)")
    if isinstance(job, QK):
        if job.layer >= e.num_layers:
            raise InvalidParams("layer", f"must be < {e.num_layers} (model {served.name!r} has {e.num_layers} blocks)")
        if job.channel >= e.head_dim:
            raise InvalidParams("channel", f"must be < {e.head_dim} (the head dimension of model {served.name!r})")


def _decode_all(ctx: Ctx, served: ServedModel, blobs: list[bytes]):
    """Bytes -> [(RGB image at its own size, preprocessed tensor)]; errors name the image."""
    out = []
    for i, data in enumerate(blobs):
        try:
            img = imaging.decode(data, ctx.settings.max_pixels)
        except imaging.ImageError as e:
            if len(blobs) > 1:
                raise type(e)(f"image {i}: {e}") from None
            raise
        out.append((img, served.preprocess(img)))
    return out


async def _until_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.2)


async def _compute(ctx: Ctx, request: Request, served: ServedModel, job: Job, blobs: list[bytes]):
    with served.batcher.arriving(len(blobs)):  # a free worker waits for these rather than start without them
        decoded = await run_in_threadpool(_decode_all, ctx, served, blobs)
        submits = [asyncio.ensure_future(served.batcher.submit((x, job))) for _, x in decoded]
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        work = asyncio.gather(*submits)
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise ClientGone("the client disconnected")
        return [img for img, _ in decoded], work.result()
    finally:
        for t in (*submits, watcher):
            t.cancel()  # a cancelled submit drops its image from the queue before it is computed


async def explain(request: Request, ctx: Ctx, method: Method) -> Response:
    params, blobs = await read_request(request, method.params, ctx.settings.max_images)
    served = ctx.pool.get(params.model)
    job = method.job(params)
    _check(job, served)
    async with asyncio.timeout(ctx.settings.request_timeout_s):
        images, results = await _compute(ctx, request, served, job, blobs)
    echo = params.model_dump(exclude={"model", "format"})
    if len(results) > 1:
        return JSONResponse({"model": served.name, "results": [method.to_json(served, echo, r) for r in results]})
    (img,), (result,) = images, results
    if method.draw is None or getattr(params, "format", "json") == "json":
        return JSONResponse(method.to_json(served, echo, result))
    body = await run_in_threadpool(lambda: imaging.encode_png(method.draw(img, result)))
    return Response(body, media_type="image/png", headers=_prediction_headers(served, result))


def _prediction_headers(served: ServedModel, result: Result) -> dict[str, str]:
    top = result.predictions[0]
    return {
        "X-Model": served.name,
        "X-Predicted-Class": str(top.class_id),
        "X-Predicted-Label": served.labels[top.class_id].encode("ascii", "replace").decode(),
        "X-Predicted-Score": f"{top.score:.6f}",
    }


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


def _body(params: type[BaseModel], png: bool, response: type[BaseModel]) -> dict:
    schema = _schema(params)
    props, required = schema.get("properties", {}), schema.get("required", [])
    many = {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}
    b64 = {"anyOf": [{"type": "string", "contentEncoding": "base64"},
                     {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}, "minItems": 1}]}
    content = {
        "multipart/form-data": {"schema": {"type": "object", "properties": {"image": many, **props}, "required": ["image", *required]}},
        "application/json": {"schema": {"type": "object", "properties": {"image": b64, **props}, "required": ["image", *required],
                                        "additionalProperties": False}},
    }
    ok: dict = {"application/json": {"schema": {"anyOf": [_schema(response), _schema(rs.MultiResponse)]}}}
    if png:
        ok["image/png"] = {"schema": {"type": "string", "format": "binary"}}
    return {
        "requestBody": {"required": True, "content": content},
        "responses": {"200": {"description": "the explanation; JSON with one result per image for several images", "content": ok}},
    }


def _route(path: str, method: Method, response: type[BaseModel], summary: str) -> None:
    async def endpoint(request: Request, ctx: Ctx = Depends(get_ctx)) -> Response:
        return await explain(request, ctx, method)

    endpoint.__name__ = method.name.replace("-", "_")
    router.add_api_route(
        path, endpoint, methods=["POST"], summary=summary,
        openapi_extra=_body(method.params, method.draw is not None, response),
        responses={code: {"model": rs.Error} for code in (400, 401, 404, 413, 415, 422, 503, 504)},
    )


_route("/rollout", ROLLOUT, rs.MaskResponse, "Attention Rollout")
_route("/grad-rollout", GRAD_ROLLOUT, rs.MaskResponse, "Gradient Attention Rollout for one class")
_route("/attention", ATTENTION, rs.AttentionResponse, "Class-token attention in every block")
_route("/qk", QK_IMAGE, rs.QKResponse, "Q or K feature image of one channel")
_route("/predict", PREDICT, rs.PredictResponse, "Top-5 classes")
