"""The app factory: settings -> metrics, model pool, middleware, routes, and how errors become
JSON answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from service import imaging, runtime
from service.api import compare, explain, explorer, meta
from service.api.deps import AppContext, InvalidParams
from service.api.echoes import safe_errors, safe_text
from service.api.explain import ClientGone
from service.api.middleware import RequestMiddleware
from service.api.parsing import ClientError
from service.batching import QueueFull, ShuttingDown
from service.budget import Abandoned, Busy, OverBudget
from service.config import RETRY_AFTER_S, Settings
from service.methods import REGISTRY
from service.metrics import Metrics
from service.models import ModelSpec
from service.pool import ModelNotReady, ModelPool, UnknownModel, resolve_devices

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    devices = resolve_devices(settings.device)
    replicas, threads = settings.replicas_per_device or 1, settings.threads
    if all(d.type == "cpu" for d in devices):
        cores = runtime.worker_cores(runtime.usable_cores(), settings.workers)
        replicas, threads = runtime.cpu_layout(cores, settings.replicas_per_device, threads)
    if threads:
        torch.set_num_threads(threads)
    if settings.tune_allocator:
        runtime.tune_allocator()
    log.info("devices %s, %d replica(s) per device, %d torch thread(s)", [str(d) for d in devices], replicas,
             torch.get_num_threads())
    metrics = Metrics()
    pool = ModelPool(
        [ModelSpec.parse(s) for s in settings.models],
        devices,
        replicas_per_device=replicas,
        dtype=settings.dtype,
        max_batch_size=settings.max_batch_size,
        max_delay_ms=settings.max_delay_ms,
        max_queue=settings.max_queue,
        on_status=metrics.set_status,
        on_batch=lambda name: lambda waits, secs: observe_batch(name, waits, secs),
    )

    def observe_batch(name: str, waits: list[float], seconds: float) -> None:
        metrics.observe_batch(name, waits, seconds)
        # with --workers, another process may answer the scrape: the depth must not wait for one here
        metrics.queue_depth.labels(model=name).set(pool.models[name].batcher.depth)

    ctx = AppContext(settings=settings, pool=pool, metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(pool.load_all())
        try:
            yield
        finally:
            ctx.draining = True
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await pool.close()

    app = FastAPI(
        title="ViT explain",
        version="0.1.0",
        description=_description(),
        lifespan=lifespan,
        redirect_slashes=False,  # a redirect would be built from the request's Host header
    )
    app.state.ctx = ctx
    app.include_router(explain.router)
    app.include_router(compare.router)
    app.include_router(meta.router)
    app.include_router(explorer.router)
    _install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["X-Request-ID", "X-Predicted-Class",
                                                                "X-Predicted-Label", "X-Predicted-Score",
                                                                *explain.FAITHFULNESS_HEADERS])
    app.add_middleware(
        RequestMiddleware, metrics=metrics, max_body=settings.max_upload_bytes,
        api_key=settings.api_key.get_secret_value() if settings.api_key is not None else None,
        cors=bool(settings.cors_origins),
    )
    return app


def _description() -> str:
    """What the service does, with every registered method (service/methods/) and its endpoint."""
    methods = "\n".join(f"- `POST {m.route}` ({m.name}): {m.summary}" for m in REGISTRY.values())
    return (f"What a Vision Transformer (timm) sees, one endpoint per method:\n\n{methods}\n\n"
            "`GET /methods` lists their parameters. The [explorer page](/) draws them in the browser.")


def _install_error_handlers(app: FastAPI) -> None:
    """Client mistakes -> 4xx with a detail; overload -> 503 + Retry-After.

    Every detail is made safe to encode (service/api/echoes.py): a message that quotes the input
    is cut short, and a validation error echoes at most a short excerpt of the value it refused,
    never NaN, an unpaired surrogate or a megabyte of it.
    """

    def answer(status: int | None, retry: bool = False):
        async def handle(_request: Request, exc: Exception) -> JSONResponse:
            code = status if status is not None else exc.status
            headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else None
            return JSONResponse({"detail": safe_text(str(exc) or type(exc).__name__)}, status_code=code,
                                headers=headers)

        return handle

    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": safe_errors(exc.errors())}, status_code=422)

    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(imaging.ImageError, answer(None))
    app.add_exception_handler(ClientError, answer(None))
    app.add_exception_handler(InvalidParams, answer(422))
    app.add_exception_handler(UnknownModel, answer(404))
    app.add_exception_handler(ModelNotReady, answer(503, retry=True))
    app.add_exception_handler(QueueFull, answer(503, retry=True))
    app.add_exception_handler(ShuttingDown, answer(503, retry=True))
    app.add_exception_handler(Busy, answer(503, retry=True))
    app.add_exception_handler(OverBudget, answer(413))
    app.add_exception_handler(ClientGone, answer(499))
    app.add_exception_handler(ClientDisconnect, answer(499))
    app.add_exception_handler(Abandoned, answer(499))  # no one reads it: the client left, or has its 504

    async def timeout(_request: Request, _exc: Exception) -> JSONResponse:
        s = app.state.ctx.settings.request_timeout_s
        return JSONResponse({"detail": f"the request took longer than {s:g} s"}, status_code=504)

    app.add_exception_handler(TimeoutError, timeout)
    # Anything else is a bug: RequestMiddleware logs it and answers 500 with no stack trace.
