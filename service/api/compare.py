"""POST /compare: one image, several method settings, each setting's map and faithfulness, ranked.

    parse -> check every setting against the model -> decode once -> one job per shared pass
    (service/methods/compare.py) -> queue -> engine (maps, then every map's curves) -> answer

Body: JSON `{"image": <base64>, "model", "settings": [{"method", "params"}, ...],
"faithfulness_steps", "removal", "order"}`, or the same fields in a multipart form with
`settings` as a JSON string. Answer: `{"model", "predictions", "results": [{"method", "params",
"mask", "faithfulness"}, ... in the order asked], "ranking"}`, the ranking best first: lowest
deletion area first (for `order=least`, where a faithful map keeps the class longest, highest
first), ties by the lower index.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from schemas import requests as rq
from schemas import responses as rs
from service import budget
from service.api.bodies import prescan_json
from service.api.deps import ContextDep
from service.api.explain import _decode_all, _schema, _unless_gone
from service.api.parsing import admit_images, read_request
from service.methods import REGISTRY, ModelShape
from service.methods import compare as cmp

router = APIRouter(tags=["explain"])


class Setting(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: str = Field(description="a method that answers one map: " + ", ".join(
        m.name for m in REGISTRY.values() if m.comparable))
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters (not model, format "
                                                                     "or the faithfulness options)")


def _settings_json(v: Any) -> Any:
    """A form field sends the settings as a JSON string."""
    if isinstance(v, str):
        prescan_json(v.encode(), max_tokens=32 * cmp.MAX_SETTINGS)
        return json.loads(v)
    return v


class CompareRequest(rq.Params):
    settings: list[Setting] = Field(min_length=1, max_length=cmp.MAX_SETTINGS,
                                    description=f"1 to {cmp.MAX_SETTINGS} method settings: a JSON list, or a JSON "
                                                "string in a form")
    faithfulness_steps: int = rq.faithfulness_steps()
    removal: rq.Removal = rq.removal()
    order: rq.Order = rq.order()

    _parse = field_validator("settings", mode="before")(_settings_json)


class CompareResult(BaseModel):
    method: str
    params: dict[str, Any]
    mask: rs.Map
    faithfulness: rs.Faithfulness


class CompareResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str
    grid: tuple[int, int]
    predictions: list[rs.Prediction]
    results: list[CompareResult]  # in the order asked
    ranking: list[int]  # indices of results, best first


def settings_of(body: CompareRequest, shape: ModelShape) -> list[tuple[str, Any]]:
    """Each setting validated as its method's own request would be; every error names its setting (422)."""
    try:
        return cmp.validate([(s.method, s.params) for s in body.settings], shape)
    except cmp.BadSettings as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors]) from None


@router.post(
    "/compare", summary="Several methods' maps of one image, from shared passes, each with its faithfulness, ranked",
    responses={code: {"model": rs.Error} for code in (400, 401, 404, 413, 415, 422, 503, 504)},
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {**_schema(CompareRequest), "required": ["image", "settings"],
                                        "properties": {"image": {"type": "string", "contentEncoding": "base64"},
                                                       **_schema(CompareRequest)["properties"]}}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["image", "settings"], "properties": {
            "image": {"type": "string", "format": "binary"},
            **{k: v for k, v in _schema(CompareRequest)["properties"].items() if k != "settings"},
            "settings": {"type": "string", "description": "the settings as a JSON list"}}}},
    }}, "responses": {"200": {"description": "every setting's map and faithfulness, and the ranking",
                              "content": {"application/json": {"schema": _schema(CompareResponse)}}}}},
)
async def compare(request: Request, ctx: ContextDep) -> JSONResponse:
    body, blobs = await read_request(request, CompareRequest, max_images=1)
    served = ctx.pool.get(body.model)
    shape = served.shape
    settings = settings_of(body, shape)
    plan = cmp.plan(settings, shape, body.faithfulness_steps, body.removal, body.order)
    target = served.preprocess.target()  # a JSON answer: the model's input only
    await admit_images(request, blobs, target, forwards=sum(job.method.forwards(job.params) for job, _ in plan))
    async with asyncio.timeout(ctx.settings.request_timeout_s):
        with served.batcher.arriving(len(plan)):  # the jobs count against the queue like images
            [decoded] = await run_in_threadpool(_decode_all, ctx, target, blobs)
            stop = budget.stop_signal()  # the engine stops the jobs' work when the request ends
            submits = [asyncio.ensure_future(served.batcher.submit((decoded.pixels, replace(job, stop=stop))))
                       for job, _ in plan]
        try:
            results = await _unless_gone(request, asyncio.gather(*submits))
        finally:
            for t in submits:
                t.cancel()
    return JSONResponse(cmp.answer(served.name, shape, settings, plan, results, body.order))
