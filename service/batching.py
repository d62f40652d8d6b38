"""Dynamic batching: concurrent requests to one model are queued and run together.

Each worker (one per model replica) takes the next batch when it is free, so batches go to
whichever replica is idle, and while one batch computes the next one fills. The compute
function runs in the worker's own thread, never on the event loop. A free worker takes a batch:

- at once when `max_batch_size` items are waiting;
- at once when the items came to an idle worker and no other request is on its way (being
  read or decoded, see `arriving`): a lone request never waits for company;
- otherwise when `max_delay_ms` has passed since the later of the oldest item's arrival and
  the moment the worker became free.

Counting from the moment the worker became free matters under load from a fixed set of
clients: when a batch finishes, its clients send their next requests a few milliseconds later,
and taking only what queued meanwhile would split the clients into two half-size cohorts for
good (observed: 16 clients ran as batches of exactly 8; batch 16 ran up to a quarter faster per
image than batch 8 on the development CPU).

The queue is bounded: past `max_queue` waiting items, `submit` raises QueueFull at once, so
that a flood is refused quickly instead of piling up; every accepted item gets an answer.
`arriving` reserves room for a request's items before they are decoded, and refuses (QueueFull)
when there is none, so that no work is done for items the queue would refuse.

Long work (activation maximization) goes in the background lane, one item per session and step:
a worker takes background items only when no foreground item waits, and at most
`max(1, workers - 1)` workers run background batches at once, so with two or more replicas one
is always free for explanations and with one replica an explanation waits at most one step.
A background batch starts when every open session (`open_session`) has submitted its next step, or
`max_delay_ms` after the worker became free: concurrent sessions step together.

A long foreground batch (one that scores the faithfulness of many maps) calls `interlude` between
its units of work: when foreground items wait meanwhile, the worker answers a batch of them there,
in its own thread, and then goes on, so that a small request beside a huge one waits for one unit
(a block of the forward pass of a chunk of faithfulness copies), not for the whole of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# The compute function answers one entry per item: a result, or the exception for that item alone.
Worker = Callable[[list[T]], Sequence["R | BaseException"]]
# Called after every batch with the queue waits of its items and the compute time, in seconds.
BatchObserver = Callable[[list[float], float], None]


class QueueFull(RuntimeError):
    """The model's queue holds max_queue items: try again later (503 with Retry-After)."""


class ShuttingDown(RuntimeError):
    """The service stopped before this item could run."""


@dataclass
class _Item(Generic[T]):
    payload: T
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class Batcher(Generic[T, R]):
    """Queue of items for one model, drained in batches by one worker per compute function."""

    def __init__(
        self,
        workers: Sequence[Worker],
        max_batch_size: int = 16,
        max_delay_ms: float = 5.0,
        max_queue: int | None = None,
        name: str = "model",
        on_batch: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1000.0
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._workers = list(workers)
        self._pending: deque[_Item[T]] = deque()
        self._background: deque[_Item[T]] = deque()
        self._arriving = 0  # requests being read or decoded that will submit soon
        self._sessions = 0  # open background sessions, each submitting one item per step
        self._background_running = 0
        self._background_limit = max(1, len(self._workers) - 1)
        self._wakeup: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._executors = [ThreadPoolExecutor(1, thread_name_prefix=f"{name}-{i}") for i in range(len(workers))]
        # Background batches of a worker run in a thread of its own at a low CPU priority, so that on
        # shared cores decoding, HTTP and the other replicas' explanations come first.
        self._background_executors = [
            ThreadPoolExecutor(1, thread_name_prefix=f"{name}-{i}-background", initializer=_low_cpu_priority)
            for i in range(len(workers))
        ]

    @property
    def depth(self) -> int:
        """Foreground items waiting, not yet taken by a worker."""
        return len(self._pending)

    @property
    def sessions(self) -> int:
        """Open background sessions."""
        return self._sessions

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._work(fn, ex, bg), name=f"batcher-{self.name}-{i}")
            for i, (fn, ex, bg) in enumerate(zip(self._workers, self._executors, self._background_executors))
        ]

    async def stop(self) -> None:
        """Stop the workers; anything still queued is answered with ShuttingDown."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for item in (*self._pending, *self._background):
            if not item.future.done():
                item.future.set_exception(ShuttingDown(f"model {self.name} is shutting down"))
        self._pending.clear()
        self._background.clear()
        for ex in (*self._executors, *self._background_executors):
            ex.shutdown(wait=False, cancel_futures=True)

    @contextlib.contextmanager
    def arriving(self, n: int = 1) -> Iterator[None]:
        """Announce n items that are on their way (call around decoding, before `submit`), so that
        a free worker waits up to max_delay for them instead of starting a batch without them.

        The announcement also reserves room in the queue: when the queued and announced items
        leave no room for n more, QueueFull is raised here, before anything is decoded, rather
        than by `submit` after all the work. The reservation ends one loop step after the block,
        once the submits created in it have run up to queueing their items, so that no other
        request can take the room in between.
        """
        if self.max_queue is not None and len(self._pending) + self._arriving + n > self.max_queue:
            raise QueueFull(f"model {self.name!r} has {len(self._pending)} images queued and {self._arriving} "
                            "on their way; "
                            "try again shortly")
        self._arriving += n
        try:
            yield
        finally:
            try:
                asyncio.get_running_loop().call_soon(self._arrived, n)
            except RuntimeError:  # no loop (a synchronous caller): end the reservation now
                self._arrived(n)

    def _arrived(self, n: int) -> None:
        self._arriving -= n
        if self._wakeup is not None:
            self._wakeup.set()

    def open_session(self, limit: int | None = None) -> Callable[[], None]:
        """Open a background session (background batches wait up to max_delay for its next step), or
        QueueFull when `limit` sessions are open. -> its close function, which may be called again."""
        if limit is not None and self._sessions >= limit:
            raise QueueFull(f"model {self.name!r} runs {self._sessions} background sessions; try again shortly")
        self._sessions += 1
        closed = False

        def close() -> None:
            nonlocal closed
            if not closed:
                closed = True
                self._sessions -= 1
                if self._wakeup is not None:
                    self._wakeup.set()

        return close

    async def submit(self, payload: T, background: bool = False) -> R:
        """Queue one item and wait for its result (or the exception raised for it).

        Background items (one step of a session) are not counted against max_queue: callers limit
        their sessions themselves."""
        if self._wakeup is None:
            raise RuntimeError(f"batcher {self.name} is not started")
        if not background and self.max_queue is not None and len(self._pending) >= self.max_queue:
            raise QueueFull(f"model {self.name!r} has {len(self._pending)} images queued; try again shortly")
        item = _Item(payload, asyncio.get_running_loop().create_future())
        (self._background if background else self._pending).append(item)
        self._wakeup.set()
        return await item.future  # cancelling the caller cancels the future: the item is skipped

    def _ready(self, free_since: float) -> tuple[deque[_Item[T]] | None, float | None]:
        """(the lane to take a batch from now, or None and how long to wait; None: until woken)."""
        now = time.monotonic()
        if self._pending:
            oldest = self._pending[0].enqueued
            came_to_idle_worker = free_since <= oldest
            deadline = max(oldest, free_since) + self.max_delay
            full = len(self._pending) >= self.max_batch_size
            alone = came_to_idle_worker and self._arriving == 0
            return (self._pending, None) if full or alone or deadline <= now else (None, deadline - now)
        if self._background and self._background_running < self._background_limit:
            deadline = max(self._background[0].enqueued, free_since) + self.max_delay
            everyone = len(self._background) >= min(max(self._sessions, 1), self.max_batch_size)
            return (self._background, None) if everyone or deadline <= now else (None, deadline - now)
        return None, None

    async def _next_batch(self, free_since: float) -> tuple[bool, list[_Item[T]]]:
        """(background?, the next batch) for a worker that has been free since `free_since` (see module doc)."""
        assert self._wakeup is not None
        while True:
            lane, wait = self._ready(free_since)
            if lane is None:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), wait)
                except TimeoutError:
                    pass
                continue
            n = min(self.max_batch_size, len(lane))
            batch = [lane.popleft() for _ in range(n)]
            live = [it for it in batch if not it.future.done()]  # callers that gave up are dropped
            if live:
                return lane is self._background, live

    async def _work(self, fn: Worker, executor: ThreadPoolExecutor, background_executor: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        free_since = float("-inf")
        while True:
            background, batch = await self._next_batch(free_since)
            started = time.monotonic()
            self._background_running += background
            try:
                if background:
                    outcomes = list(await loop.run_in_executor(background_executor, fn, [it.payload for it in batch]))
                    if len(outcomes) != len(batch):
                        raise RuntimeError(f"worker answered {len(outcomes)} results for {len(batch)} items")
                else:
                    outcomes = await loop.run_in_executor(executor, self._foreground, fn, loop, batch, 0)
            except Exception as e:  # noqa: BLE001 - the batch's callers get the error, the worker goes on
                outcomes = [e] * len(batch)
            finally:
                self._background_running -= background
            free_since = time.monotonic()
            self._deliver(batch, outcomes, started, free_since, background)

    def _foreground(self, fn: Worker, loop: asyncio.AbstractEventLoop, batch: list[_Item[T]],
                    depth: int) -> list:
        """In the worker's thread: fn over the batch, with `interlude` able to answer waiting
        requests between its units of work (up to MAX_INTERLUDES deep)."""
        previous = getattr(_local, "interlude", None)
        _local.interlude = (lambda: self._interlude(fn, loop, depth + 1)) if depth < MAX_INTERLUDES else None
        try:
            outcomes = list(fn([it.payload for it in batch]))
        finally:
            _local.interlude = previous
        if len(outcomes) != len(batch):
            raise RuntimeError(f"worker answered {len(outcomes)} results for {len(batch)} items")
        return outcomes

    def _interlude(self, fn: Worker, loop: asyncio.AbstractEventLoop, depth: int) -> None:
        """In the worker's thread, between units of a long batch: when foreground items wait, take
        a batch of them from the loop and answer it now, in this thread, then return to the long one."""
        if not self._pending:  # a deque's length, read without the loop: cheap, and wrong only for a moment
            return
        taken: Future = Future()
        lock = threading.Lock()  # the items are taken, or this thread has given up on them: not both
        gone = False

        def take() -> None:  # on the loop
            with lock:
                if gone:
                    return
                n = min(self.max_batch_size, len(self._pending))
                taken.set_result([it for it in (self._pending.popleft() for _ in range(n)) if not it.future.done()])

        try:
            loop.call_soon_threadsafe(take)
            batch = taken.result(timeout=INTERLUDE_TAKE_S)
        except (RuntimeError, TimeoutError):  # the loop is closed, or too busy to answer: go on with the batch
            with lock:
                gone = True
                batch = taken.result() if taken.done() else []
        if not batch:
            return
        started = time.monotonic()
        try:
            outcomes = self._foreground(fn, loop, batch, depth)
        except Exception as e:  # noqa: BLE001 - the batch's callers get the error, the long batch goes on
            outcomes = [e] * len(batch)
        with contextlib.suppress(RuntimeError):  # the loop is closed: no one waits for them
            loop.call_soon_threadsafe(self._deliver, batch, outcomes, started, time.monotonic(), False)

    def _deliver(self, batch: list[_Item[T]], outcomes: Sequence, started: float, ended: float,
                 background: bool) -> None:
        """On the loop: each item's outcome to its caller (who may have given up)."""
        if self._on_batch is not None and not background:
            self._on_batch([started - it.enqueued for it in batch], ended - started)
        for it, out in zip(batch, outcomes):
            if it.future.done():
                continue
            if isinstance(out, BaseException):
                it.future.set_exception(out)
            else:
                it.future.set_result(out)


# Foreground batches answered inside a long one, one inside the other at most this deep.
MAX_INTERLUDES = 2
INTERLUDE_TAKE_S = 5.0  # longest wait for the loop to hand over the waiting items
_local = threading.local()  # the worker thread's `interlude`, while it runs a foreground batch


def interlude() -> None:
    """Called by compute that runs in units (the chunks of faithfulness scoring, their blocks) between them: when
    foreground requests wait for this model, answer a batch of them now, in this worker's thread, so
    that a small request beside a long batch waits for one unit, not for the whole batch. A no-op
    outside a batcher's foreground batch."""
    hook = getattr(_local, "interlude", None)
    if hook is not None:
        hook()


BACKGROUND_NICE = 10  # Linux CFS weight 110 against 1024 at nice 0: about a tenth of a contended core


def _low_cpu_priority() -> None:
    """Lower the calling thread's CPU priority to BACKGROUND_NICE (Linux: a thread is a task; elsewhere a no-op).

    Threads it starts (torch's intra-op pool) inherit it. Lowering needs no privilege; raising
    back would, so the background lane has threads of its own."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (AttributeError, OSError):
        pass
