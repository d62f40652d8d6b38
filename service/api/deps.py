"""What routes need from the app: settings, model pool, metrics; and the client-error type."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from service.config import Settings
from service.metrics import Metrics
from service.pool import ModelPool


class InvalidParams(ValueError):
    """A parameter out of range for the chosen model (422), e.g. a class id past the last class."""

    def __init__(self, field: str, msg: str) -> None:
        super().__init__(f"{field}: {msg}")
        self.field = field


@dataclass
class Ctx:
    settings: Settings
    pool: ModelPool
    metrics: Metrics
    draining: bool = False  # set on shutdown: readiness answers 503 while queued work finishes


def get_ctx(request: Request) -> Ctx:
    return request.app.state.ctx
