"""The explanation endpoints: thin routes over decode -> queue -> engine -> encode."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from schemas import requests as rq
from schemas import responses as rs
from service import imaging
from service.api.deps import Ctx, InvalidParams, get_ctx
from service.engine.jobs import QK, GradRollout, Job, LayerAttention, Predict, Result, Rollout
from service.pool import ServedModel

router = APIRouter(tags=["explain"])

_PNG = {200: {"content": {"image/png": {}}, "description": "PNG, or JSON with format=json"}}


# -- stages -----------------------------------------------------------------------------------
async def _decode(ctx: Ctx, served: ServedModel, image: UploadFile):
    """Upload -> (RGB image at its own size, preprocessed tensor), off the event loop."""
    data = await image.read()
    if len(data) > ctx.settings.max_upload_mb * 1024 * 1024:
        raise imaging.ImageTooLarge(f"the upload is {len(data)} bytes, more than {ctx.settings.max_upload_mb} MB")

    def work():
        img = imaging.decode(data, ctx.settings.max_pixels)
        return img, served.preprocess(img)

    return await run_in_threadpool(work)


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


async def _explain(ctx: Ctx, params: rq._Params, job: Job):
    served = ctx.pool.get(params.model)
    _check(job, served)
    img, x = await _decode(ctx, served, params.image)
    result: Result = await served.batcher.submit((x, job))
    return served, img, result


def _predictions(served: ServedModel, result: Result) -> list[rs.Prediction]:
    return [rs.Prediction(class_id=p.class_id, label=served.labels[p.class_id], score=p.score) for p in result.predictions]


def _headers(served: ServedModel, result: Result) -> dict[str, str]:
    top = result.predictions[0]
    label = served.labels[top.class_id].encode("ascii", "replace").decode()
    return {
        "X-Model": served.name,
        "X-Predicted-Class": str(top.class_id),
        "X-Predicted-Label": label,
        "X-Predicted-Score": f"{top.score:.6f}",
    }


async def _png(served: ServedModel, result: Result, draw, *args) -> Response:
    body = await run_in_threadpool(lambda: imaging.encode_png(draw(*args)))
    return Response(body, media_type="image/png", headers=_headers(served, result))


def _params(params: rq._Params, served: ServedModel) -> dict[str, Any]:
    return {k: v for k, v in params.model_dump().items() if k not in ("image", "model", "format")}


async def _mask_answer(method: str, params, served: ServedModel, img, result: Result):
    if params.format == "png":
        return await _png(served, result, imaging.overlay, img, result.maps)
    return rs.MaskResponse(
        model=served.name, method=method, params=_params(params, served),
        grid=served.engine.grid, mask=result.maps.tolist(), predictions=_predictions(served, result),
    )


# -- routes -----------------------------------------------------------------------------------
@router.post("/rollout", response_model=rs.MaskResponse, responses=_PNG, summary="Attention Rollout")
async def rollout(params: Annotated[rq.RolloutParams, Form()], ctx: Ctx = Depends(get_ctx)):
    job = Rollout(head_fusion=params.head_fusion, discard_ratio=params.discard_ratio)
    served, img, result = await _explain(ctx, params, job)
    return await _mask_answer("rollout", params, served, img, result)


@router.post("/grad-rollout", response_model=rs.MaskResponse, responses=_PNG, summary="Gradient Attention Rollout for one class")
async def grad_rollout(params: Annotated[rq.GradRolloutParams, Form()], ctx: Ctx = Depends(get_ctx)):
    job = GradRollout(category_id=params.category_id, head_fusion=params.head_fusion, discard_ratio=params.discard_ratio)
    served, img, result = await _explain(ctx, params, job)
    return await _mask_answer("grad-rollout", params, served, img, result)


@router.post("/attention", response_model=rs.AttentionResponse, responses=_PNG, summary="Class-token attention in every block")
async def attention(params: Annotated[rq.AttentionParams, Form()], ctx: Ctx = Depends(get_ctx)):
    served, img, result = await _explain(ctx, params, LayerAttention(head=params.head))
    if params.format == "png":
        return await _png(served, result, imaging.montage, img, result.maps)
    return rs.AttentionResponse(
        model=served.name, params=_params(params, served), grid=served.engine.grid, layers=result.maps.tolist()
    )


@router.post("/qk", response_model=rs.QKResponse, responses=_PNG, summary="Q or K feature image of one channel")
async def qk(params: Annotated[rq.QKParams, Form()], ctx: Ctx = Depends(get_ctx)):
    job = QK(layer=params.layer, head=params.head, channel=params.channel, which=params.which)
    served, img, result = await _explain(ctx, params, job)
    if params.format == "png":
        return await _png(served, result, imaging.grayscale, result.maps, img.size)
    return rs.QKResponse(model=served.name, params=_params(params, served), grid=served.engine.grid, map=result.maps.tolist())


@router.post("/predict", response_model=rs.PredictResponse, summary="Top-5 classes")
async def predict(params: Annotated[rq.PredictParams, Form()], ctx: Ctx = Depends(get_ctx)):
    served, _, result = await _explain(ctx, params, Predict())
    return rs.PredictResponse(model=served.name, predictions=_predictions(served, result))
