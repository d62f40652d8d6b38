"""What routes need from the app: settings, model pool, metrics."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from service.config import Settings
from service.methods.base import InvalidParams  # noqa: F401  (re-exported: the 422 of model-dependent ranges)
from service.metrics import Metrics
from service.pool import ModelPool


@dataclass
class Ctx:
    settings: Settings
    pool: ModelPool
    metrics: Metrics
    draining: bool = False  # set on shutdown: readiness answers 503 while queued work finishes


def get_ctx(request: Request) -> Ctx:
    return request.app.state.ctx
