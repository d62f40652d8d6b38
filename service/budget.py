"""What one request may cost, shared across requests: a deadline, and budgets of pixels and bytes.

- The deadline (a ContextVar set by the HTTP middleware for each request) is visible in the
  worker threads that decode, draw and encode for the request (anyio copies the context into
  them), so that long work checks it between steps and stops with TimeoutError (504) instead of
  running on for a client that has been answered already.
- A Budget is a FIFO counting semaphore over an amount (pixels decoded or drawn at once, request
  body bytes held at once): a request waits for its share, or is refused with Busy (503 +
  Retry-After) when it cannot have it soon. A Lease is one request's holdings; the middleware
  returns it when the request's task has ended, i.e. when no thread works for it any more.

Nothing here knows about HTTP; everything but `check_deadline` runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from collections.abc import Callable

deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


class Busy(RuntimeError):
    """The shared budget is spent by other requests: try again shortly (503 + Retry-After)."""


class OverBudget(ValueError):
    """One request asks for more than the whole budget: it can never run (413)."""

    status = 413


class Abandoned(RuntimeError):
    """No one waits for this work any more (the client left, or was answered 504): stop it."""


def check_deadline(what: str = "the request") -> None:
    """Raise TimeoutError when the current request's deadline has passed, Abandoned when its
    client has gone or has been answered already (no-op outside a request)."""
    due = deadline.get()
    if due is not None and time.monotonic() > due:
        raise TimeoutError(f"{what} ran past the request timeout")
    held = lease.get()
    if held is not None and held.stopped:
        raise Abandoned(f"{what} stopped: {held.stopped}")


def stop_signal() -> Callable[[], BaseException | None] | None:
    """The current request's deadline and lease as one cheap check for threads outside its context
    (a model replica's batch, which holds several requests' images): -> the error its work stops
    with now (TimeoutError past its deadline, Abandoned when its client left or was answered), else
    None. None outside a request."""
    due, held = deadline.get(), lease.get()
    if due is None and held is None:
        return None

    def why() -> BaseException | None:
        if held is not None and held.stopped:
            return Abandoned(f"the work stopped: {held.stopped}")
        if due is not None and time.monotonic() > due:
            return TimeoutError("the work ran past the request timeout")
        return None

    return why


def remaining() -> float | None:
    due = deadline.get()
    return None if due is None else due - time.monotonic()


class Budget:
    """FIFO counting semaphore over `capacity` units, for the event loop's thread only."""

    def __init__(self, capacity: int, name: str, limit: str = "") -> None:
        if capacity < 1:
            raise ValueError("a budget needs a capacity of at least 1")
        self.capacity = capacity
        self.name = name
        self.limit = limit  # how the limit is set (a flag), named in the refusal of a request over it
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    def try_take(self, n: int) -> bool:
        if n <= self.capacity - self.used and not self._waiters:
            self.used += n
            return True
        return False

    async def take(self, n: int, wait_s: float) -> None:
        """Take n units, waiting up to wait_s behind earlier takers; Busy when that is not enough."""
        if n > self.capacity:
            where = f" ({self.limit})" if self.limit else ""
            raise OverBudget(f"{n} {self.name} in one request, more than the {self.capacity} the service holds at once"
                             f"{where}")
        if self.try_take(n):
            return
        if wait_s <= 0:
            raise Busy(f"the service holds its limit of {self.name} at once; try again shortly")
        entry = (n, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(wait_s):
                await entry[1]
        except BaseException as e:
            granted = entry[1].done() and not entry[1].cancelled()
            if granted:
                self.give(n)  # granted just as we gave up: hand it on
            else:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                self._wake()
            if isinstance(e, TimeoutError):
                raise Busy(f"the service holds its limit of {self.name} at once; try again shortly") from None
            raise

    def give(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if n > self.capacity - self.used:
                return  # FIFO: a large request is not starved by smaller ones behind it
            self._waiters.popleft()
            self.used += n
            fut.set_result(True)


class Lease:
    """What one request holds of each budget; `end` gives it all back."""

    def __init__(self) -> None:
        self._held: list[tuple[Budget, int]] = []
        self.ended = False
        self.stopped: str | None = None  # why the request's work must stop (read by check_deadline)

    def stop(self, why: str) -> None:
        """Tell the request's work (its threads included) to stop at its next check_deadline."""
        self.stopped = self.stopped or why

    def hold(self, budget: Budget, n: int) -> None:
        """Record n units already taken from budget (given back by `end`)."""
        if self.ended:
            budget.give(n)
            return
        self._held.append((budget, n))

    async def take(self, budget: Budget, n: int, wait_s: float) -> None:
        await budget.take(n, wait_s)
        self.hold(budget, n)

    def end(self) -> None:
        self.ended = True
        held, self._held = self._held, []
        for budget, n in held:
            budget.give(n)


lease: contextvars.ContextVar[Lease | None] = contextvars.ContextVar("lease", default=None)
