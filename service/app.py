"""The app factory: settings -> model pool -> routes, and how errors become JSON answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service import imaging
from service.api import explain, meta
from service.api.deps import Ctx, InvalidParams
from service.config import Settings
from service.models import ModelSpec
from service.pool import ModelNotReady, ModelPool, UnknownModel, resolve_device

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    pool = ModelPool(
        [ModelSpec.parse(s) for s in settings.models],
        device=resolve_device(settings.device),
        max_batch_size=settings.max_batch_size,
        max_delay_ms=settings.max_delay_ms,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(pool.load_all())
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await pool.close()

    app = FastAPI(
        title="ViT explain",
        version="0.1.0",
        description="What a Vision Transformer sees: attention rollout, gradient rollout, per-layer "
        "class-token attention and Q/K feature images for timm ViTs.",
        lifespan=lifespan,
    )
    app.state.ctx = Ctx(settings=settings, pool=pool)
    app.include_router(explain.router)
    app.include_router(meta.router)
    _install_error_handlers(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    def handler(status: int | None):
        async def handle(_request: Request, exc: Exception) -> JSONResponse:
            code = status if status is not None else getattr(exc, "status", 422)
            headers = {"Retry-After": "5"} if code == 503 else None
            return JSONResponse({"detail": str(exc)}, status_code=code, headers=headers)

        return handle

    app.add_exception_handler(imaging.ImageError, handler(None))
    app.add_exception_handler(InvalidParams, handler(422))
    app.add_exception_handler(UnknownModel, handler(404))
    app.add_exception_handler(ModelNotReady, handler(503))
