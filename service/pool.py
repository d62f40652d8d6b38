"""The models the service keeps resident: load, replicate over devices, warm up, queue, look up.

Each configured model becomes a ServedModel with a status (loading -> ready, or unavailable
with the reason) and one Engine per replica (replicas-per-device copies on every device), all
fed by one Batcher: a free replica takes the next batch, so batches go to the least busy one.
Loading runs in a background thread so that the process is live at once and ready (GET /readyz)
when every model has settled.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import huggingface_hub
import numpy as np
import torch

from service import batching, methods, models
from service.batching import Batcher, BatchObserver
from service.engine import device_decode
from service.engine.contract import Job, ModelShape, Result
from service.engine.engine import Engine

log = logging.getLogger(__name__)

Status = Literal["loading", "ready", "unavailable"]
# What the batcher queues. For one-pass methods: (the image as uint8 (H, W, 3) at the model's input
# size, or its JPEG bytes for the device to decode, job); for a step of long work: (its state, job).
Item = tuple[object, Job]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnknownModel(LookupError):
    """No configured model has this alias (404)."""


class ModelNotReady(RuntimeError):
    """The model is configured but cannot answer now (503): still loading, or failed to load."""


def resolve_devices(spec: str) -> list[torch.device]:
    """`auto`, `cpu`, `cuda`, `cuda:N` or a comma list -> devices; CUDA asked for but absent is an error."""
    if spec == "auto":
        return [torch.device("cuda" if torch.cuda.is_available() else "cpu")]
    devices = [torch.device(s.strip()) for s in spec.split(",") if s.strip()]
    for d in devices:
        if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
            raise ValueError(f"device {d} requested but not available (CUDA devices: {torch.cuda.device_count()})")
        if d.type not in ("cpu", "cuda"):
            raise ValueError(f"unsupported device {d}")
    if not devices:
        raise ValueError(f"no device in {spec!r}")
    return devices


def isolate_failures(run: Callable[[list[Item]], list[Result]], items: list[Item]) -> list[Result | BaseException]:
    """Run a batch so that one bad item or an out-of-memory error fails only what it must.

    CUDA out of memory: split the batch in halves and retry each. Any other error in a batch of
    several: run the items one by one, so each gets its own result or its own exception.
    """
    try:
        return list(run(items))
    except torch.cuda.OutOfMemoryError as e:
        if len(items) == 1:
            return [e]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(items) // 2
        log.warning("out of memory on a batch of %d: retrying as %d + %d", len(items), half, len(items) - half)
        return isolate_failures(run, items[:half]) + isolate_failures(run, items[half:])
    except Exception as e:  # noqa: BLE001 - decide per item below
        if len(items) == 1:
            return [e]
        log.warning("a batch of %d failed (%s: %s): retrying its items one by one", len(items), type(e).__name__, e)
        return [isolate_failures(run, [it])[0] for it in items]


@dataclass
class ServedModel:
    spec: models.ModelSpec
    devices: list[torch.device]
    replicas_per_device: int = 1
    dtype: torch.dtype = torch.float32
    status: Status = "loading"
    reason: str | None = None
    engines: list[Engine] = field(default_factory=list)
    preprocess: models.Preprocess | None = None
    batcher: Batcher[Item, Result] | None = None

    @property
    def name(self) -> str:
        return self.spec.alias

    @property
    def engine(self) -> Engine | None:
        """The first replica: every replica has the same shape (grid, layers, heads)."""
        return self.engines[0] if self.engines else None

    @property
    def shape(self) -> ModelShape:
        assert self.engine is not None, "the model is not loaded"
        return self.engine.shape

    @property
    def labels(self) -> tuple[str, ...]:
        return self.engine.shape.labels if self.engine else ()

    def load(self) -> None:
        """Blocking: create the model, check it can be explained, place replicas, warm each up."""
        model = models.create(self.spec)
        engines = []
        for device in self.devices:
            for _ in range(self.replicas_per_device):
                engine = Engine(copy.deepcopy(model), device, self.dtype, name=self.name)
                engine.warmup(methods.warmup_jobs())
                engines.append(engine)
        self.preprocess = models.Preprocess.from_anatomy(engines[0].anatomy)
        self.engines = engines

    def worker(self, engine: Engine) -> Callable[[list[Item]], list[Result | BaseException]]:
        """The batcher's compute function for one replica: stack images, run, isolate failures.

        A batch is all one-pass jobs or all steps of long work (the batcher's two lanes)."""

        def run(items: list[Item]) -> list[Result] | list[float]:
            jobs = [j for _, j in items]
            if jobs[0].method.kind == "long":
                return engine.step([state for state, _ in items], jobs)
            return engine.run(self.pixels(engine, [x for x, _ in items]), jobs, between=batching.interlude)

        return lambda items: isolate_failures(run, items)

    def pixels(self, engine: Engine, xs: list) -> torch.Tensor:
        """A batch's images -> (B, H, W, 3) uint8: decoded uploads stacked, uploads left encoded
        (bytes, --decode-on-device) decoded together on the replica's device and put in their place."""
        encoded = [i for i, x in enumerate(xs) if isinstance(x, bytes)]
        if not encoded:
            return torch.from_numpy(np.stack(xs))
        decoded = device_decode.decode_resize([xs[i] for i in encoded], self.preprocess.size, engine.device,
                                              self.preprocess.interpolation)
        if len(encoded) == len(xs):
            return decoded
        out = torch.empty((len(xs), *decoded.shape[1:]), dtype=torch.uint8, device=engine.device)
        out[encoded] = decoded
        rest = sorted(set(range(len(xs))) - set(encoded))
        out[rest] = torch.from_numpy(np.stack([xs[i] for i in rest])).to(engine.device)
        return out

    def start(self, max_batch_size: int, max_delay_ms: float, max_queue: int, on_batch: BatchObserver | None) -> None:
        self.batcher = Batcher(
            [self.worker(e) for e in self.engines], max_batch_size, max_delay_ms, max_queue, self.name, on_batch
        )
        self.batcher.start()
        self.status = "ready"


class ModelPool:
    def __init__(
        self,
        specs: Sequence[models.ModelSpec],
        devices: list[torch.device],
        *,
        replicas_per_device: int = 1,
        dtype: str = "float32",
        max_batch_size: int = 16,
        max_delay_ms: float = 5.0,
        max_queue: int = 256,
        on_status: Callable[[str, str], None] | None = None,
        on_batch: Callable[[str], BatchObserver] | None = None,
    ) -> None:
        if not specs:
            raise ValueError("no models configured")
        aliases = [s.alias for s in specs]
        dupes = sorted({a for a in aliases if aliases.count(a) > 1})
        if dupes:
            raise ValueError(f"model aliases must be unique; repeated: {', '.join(dupes)}")
        if dtype != "float32" and any(d.type != "cuda" for d in devices):
            raise ValueError(f"dtype {dtype} runs on CUDA only")
        self.models = {
            s.alias: ServedModel(spec=s, devices=devices, replicas_per_device=replicas_per_device, dtype=DTYPES[dtype])
            for s in specs
        }
        self.max_batch_size = max_batch_size
        self.max_delay_ms = max_delay_ms
        self.max_queue = max_queue
        self._on_status = on_status or (lambda _name, _status: None)
        self._on_batch = on_batch
        for m in self.models.values():
            self._on_status(m.name, m.status)

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
        await asyncio.to_thread(models.offline_unless_hub_reachable, [m.spec for m in self.models.values()])
        for m in self.models.values():
            try:
                await asyncio.to_thread(m.load)
            except Exception as e:  # noqa: BLE001 - any load failure is reported, never fatal
                m.status, m.reason = "unavailable", f"{type(e).__name__}: {e}"
                if m.spec.uses_hub and huggingface_hub.constants.HF_HUB_OFFLINE:
                    m.reason = ("weights are not in the local Hugging Face cache and the hub is offline or "
                                f"unreachable ({m.reason})")
                log.warning("model %s (%s) is unavailable: %s", m.name, m.spec.spec, m.reason)
            else:
                on_batch = self._on_batch(m.name) if self._on_batch else None
                m.start(self.max_batch_size, self.max_delay_ms, self.max_queue, on_batch)
                log.info("model %s (%s) ready: %d replica(s) on %s", m.name, m.spec.spec, len(m.engines),
                         ", ".join(str(d) for d in m.devices))
            self._on_status(m.name, m.status)

    async def close(self) -> None:
        for m in self.models.values():
            if m.batcher is not None:
                await m.batcher.stop()
