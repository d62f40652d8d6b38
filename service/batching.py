"""Dynamic batching: concurrent requests to one model are queued and run together.

A batch flushes when it holds `max_batch_size` items or when its oldest item has waited
`max_delay_ms`. Each worker (one per model replica) takes the next batch when it is free, so
batches go to whichever replica is idle, and while one batch computes the next one fills.
The compute function runs in the worker's own thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Item(Generic[T]):
    payload: T
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class Batcher(Generic[T, R]):
    """Queue of items for one model, drained in batches by one worker per compute function."""

    def __init__(
        self,
        workers: Sequence[Callable[[list[T]], list[R]]],
        max_batch_size: int = 16,
        max_delay_ms: float = 5.0,
        name: str = "model",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1000.0
        self._workers = list(workers)
        self._pending: deque[_Item[T]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._executors = [ThreadPoolExecutor(1, thread_name_prefix=f"{name}-{i}") for i in range(len(workers))]
        self.name = name
        self.batch_sizes: Counter[int] = Counter()  # how many batches of each size ran

    @property
    def depth(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._work(fn, ex), name=f"batcher-{self.name}-{i}")
            for i, (fn, ex) in enumerate(zip(self._workers, self._executors))
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(RuntimeError("the service is shutting down"))
        self._pending.clear()
        for ex in self._executors:
            ex.shutdown(wait=False, cancel_futures=True)

    async def submit(self, payload: T) -> R:
        """Queue one item and wait for its result (or the exception its batch raised)."""
        if self._wakeup is None:
            raise RuntimeError(f"batcher {self.name} is not started")
        item = _Item(payload, asyncio.get_running_loop().create_future())
        self._pending.append(item)
        self._wakeup.set()
        return await item.future

    async def _next_batch(self) -> list[_Item[T]]:
        assert self._wakeup is not None
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            wait = self._pending[0].enqueued + self.max_delay - time.monotonic()
            if len(self._pending) < self.max_batch_size and wait > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                continue
            n = min(self.max_batch_size, len(self._pending))
            batch = [self._pending.popleft() for _ in range(n)]
            live = [it for it in batch if not it.future.done()]  # callers that gave up are dropped
            if live:
                return live

    async def _work(self, fn: Callable[[list[T]], list[R]], executor: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            self.batch_sizes[len(batch)] += 1
            try:
                results: list[Any] = await loop.run_in_executor(executor, fn, [it.payload for it in batch])
                outcomes = [(r, None) for r in results]
            except Exception as e:  # noqa: BLE001 - the batch's callers get the error, the worker goes on
                outcomes = [(None, e)] * len(batch)
            for it, (r, e) in zip(batch, outcomes):
                if it.future.done():
                    continue
                if e is None:
                    it.future.set_result(r)
                else:
                    it.future.set_exception(e)
