"""Service metadata: the models, liveness, readiness and metrics. The first three answer HEAD
too (probes and load balancers use it): the same status and headers, no body."""

from __future__ import annotations

import os

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from schemas import responses as rs
from service.api.deps import ContextDep

router = APIRouter(tags=["service"])


def get_and_head(path: str, **kwargs):
    """A GET route that answers HEAD too; only the GET is in OpenAPI (one operation id per path)."""

    def register(endpoint):
        router.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)
        return router.get(path, **kwargs)(endpoint)

    return register


@get_and_head("/models", response_model=list[rs.ModelInfo], summary="Configured models and their status")
async def list_models(ctx: ContextDep) -> list[rs.ModelInfo]:
    default = ctx.pool.default
    out = []
    for m in ctx.pool.models.values():
        e = m.engine
        shape = dict(grid=e.grid, classes=len(m.labels), prefix_tokens=e.prefix, layers=e.num_layers,
                     heads=e.num_heads, head_dim=e.head_dim, embed_dim=e.shape.embed_dim, source=e.anatomy.source,
                     family=e.anatomy.family, pooling=e.anatomy.pooling) if e else {}
        out.append(rs.ModelInfo(
            name=m.name, spec=m.spec.spec, status=m.status, reason=m.reason,
            device=", ".join(str(d) for d in m.devices), replicas=len(m.engines), default=m is default, **shape,
        ))
    return out


@get_and_head("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str | int]:
    return {"status": "ok", "pid": os.getpid()}  # with --workers, which process answered


@get_and_head("/readyz", summary="Readiness: every model has settled (loaded and warmed, or failed) and one is ready")
async def readyz(ctx: ContextDep) -> JSONResponse:
    states = {m.name: m.status for m in ctx.pool.models.values()}
    ready = not ctx.draining and ctx.pool.settled and any(s == "ready" for s in states.values())
    status = "draining" if ctx.draining else "ready" if ready else "not ready"
    return JSONResponse({"status": status, "models": states, "pid": os.getpid()}, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(ctx: ContextDep) -> Response:
    for m in ctx.pool.models.values():
        ctx.metrics.queue_depth.labels(model=m.name).set(m.batcher.depth if m.batcher else 0)
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)
