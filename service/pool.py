"""The models the service keeps resident: load, warm up, queue, and look up by alias.

Each configured model becomes a ServedModel with a status (loading -> ready, or unavailable
with the reason). Loading runs in a background thread so that the process is live at once and
ready (GET /readyz) when every model has settled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from service import models
from service.batching import Batcher
from service.engine.jobs import Job, Result
from service.engine.runner import Engine

log = logging.getLogger(__name__)

Status = Literal["loading", "ready", "unavailable"]


class UnknownModel(LookupError):
    """No configured model has this alias (404)."""


class ModelNotReady(RuntimeError):
    """The model is configured but cannot answer now (503): still loading, or failed to load."""


@dataclass
class ServedModel:
    spec: models.ModelSpec
    device: torch.device
    status: Status = "loading"
    reason: str | None = None
    engine: Engine | None = None
    labels: list[str] = field(default_factory=list)
    preprocess: models.Preprocess | None = None
    batcher: Batcher[tuple[torch.Tensor, Job], Result] | None = None

    @property
    def name(self) -> str:
        return self.spec.alias

    def load(self) -> None:
        """Blocking: create the model, check it can be explained, move it to its device, warm up."""
        model = models.create(self.spec)
        engine = Engine(model, self.device)
        engine.warmup()
        self.labels = models.class_labels(model)
        self.preprocess = models.Preprocess.from_model(model)
        self.engine = engine

    def run_batch(self, items: list[tuple[torch.Tensor, Job]]) -> list[Result]:
        """Worker-thread entry point for the batcher: stack the images, run the engine."""
        assert self.engine is not None
        images = torch.stack([x for x, _ in items])
        return self.engine.run(images, [j for _, j in items])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


class ModelPool:
    def __init__(
        self, specs: Sequence[models.ModelSpec], device: torch.device, max_batch_size: int, max_delay_ms: float
    ) -> None:
        aliases = [s.alias for s in specs]
        dupes = sorted({a for a in aliases if aliases.count(a) > 1})
        if dupes:
            raise ValueError(f"model aliases must be unique; repeated: {', '.join(dupes)}")
        if not specs:
            raise ValueError("no models configured")
        self.models = {s.alias: ServedModel(spec=s, device=device) for s in specs}
        self.max_batch_size = max_batch_size
        self.max_delay_ms = max_delay_ms

    @property
    def default(self) -> ServedModel:
        """The first configured model that is ready, else the first configured model."""
        for m in self.models.values():
            if m.status == "ready":
                return m
        return next(iter(self.models.values()))

    @property
    def settled(self) -> bool:
        return all(m.status != "loading" for m in self.models.values())

    def get(self, name: str | None) -> ServedModel:
        """The ready model named `name` (None: the default), or UnknownModel / ModelNotReady."""
        if name is None:
            m = self.default
        elif name in self.models:
            m = self.models[name]
        else:
            raise UnknownModel(f"unknown model {name!r}; configured models: {', '.join(self.models)}")
        if m.status == "loading":
            raise ModelNotReady(f"model {m.name!r} is still loading")
        if m.status == "unavailable":
            raise ModelNotReady(f"model {m.name!r} is unavailable: {m.reason}")
        return m

    async def load_all(self) -> None:
        """Load every model in turn off the event loop; a failure makes that model unavailable."""
        for m in self.models.values():
            try:
                await asyncio.to_thread(m.load)
            except Exception as e:  # noqa: BLE001 - any load failure is reported, never fatal
                m.status, m.reason = "unavailable", f"{type(e).__name__}: {e}"
                log.warning("model %s (%s) is unavailable: %s", m.name, m.spec.spec, m.reason)
                continue
            m.batcher = Batcher([m.run_batch], self.max_batch_size, self.max_delay_ms, name=m.name)
            m.batcher.start()
            m.status = "ready"
            log.info("model %s (%s) ready on %s", m.name, m.spec.spec, m.device)

    async def close(self) -> None:
        for m in self.models.values():
            if m.batcher is not None:
                await m.batcher.stop()
