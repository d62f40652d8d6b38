"""Service metadata: the models, liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from schemas import responses as rs
from service.api.deps import Ctx, get_ctx

router = APIRouter(tags=["service"])


@router.get("/models", response_model=list[rs.ModelInfo], summary="Configured models and their status")
async def list_models(ctx: Ctx = Depends(get_ctx)) -> list[rs.ModelInfo]:
    default = ctx.pool.default
    out = []
    for m in ctx.pool.models.values():
        e = m.engine
        out.append(
            rs.ModelInfo(
                name=m.name, spec=m.spec.spec, status=m.status, reason=m.reason, device=str(m.device),
                grid=e.grid if e else None, classes=len(m.labels) if e else None,
                prefix_tokens=e.prefix if e else None, layers=e.num_layers if e else None,
                heads=e.num_heads if e else None, head_dim=e.head_dim if e else None,
                default=m is default,
            )
        )
    return out


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: every model has loaded and warmed up")
async def readyz(ctx: Ctx = Depends(get_ctx)) -> JSONResponse:
    states = {m.name: m.status for m in ctx.pool.models.values()}
    ready = ctx.pool.settled and any(s == "ready" for s in states.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "models": states}, status_code=200 if ready else 503)
