"""The overall deadline of a call, retries and waits included: set once per call, read by every piece
that waits (a connection's reads and writes, the body's chunks, the wait before a retry)."""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator

DEADLINE_S = 600.0  # longest a call may take, retries and their waits included

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("client_deadline", default=None)


class _Late(Exception):
    """The call's deadline passed while its answer was still coming."""


def _left() -> float | None:
    """Seconds left to the running call (negative: past its deadline); None outside a call."""
    due = _deadline.get()
    return None if due is None else due - time.monotonic()


@contextlib.contextmanager
def _within(seconds: float) -> Iterator[None]:
    """Run a call within `seconds` from now (the deadline `_left` reads)."""
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)
