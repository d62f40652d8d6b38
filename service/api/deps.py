"""What routes need from the app: its settings, model pool and metrics, as one dependency.

    async def route(ctx: ContextDep): ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from service.config import Settings
from service.methods.base import InvalidParams  # noqa: F401  (re-exported: the 422 of model-dependent ranges)
from service.metrics import Metrics
from service.pool import ModelPool


@dataclass
class AppContext:
    """What the app holds for its routes (app.state.ctx), made once by create_app."""

    settings: Settings
    pool: ModelPool
    metrics: Metrics
    draining: bool = False  # set on shutdown: readiness answers 503 while queued work finishes


def get_context(request: Request) -> AppContext:
    return request.app.state.ctx


ContextDep = Annotated[AppContext, Depends(get_context)]
