"""One call's send-and-retry loop, its decisions made once for both clients (no I/O here): what an
answer's status means (read it, or wait and send again), what a failed connection means (send again,
or give up with the error it is), how the body is read (whole and checked, or as server-sent events)
and what the deadline turns into. `Client` and `AsyncClient` (clients.py) only send, read and sleep."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from service.client.answers import AnswerError, _Body, _check_status, _check_stream, _excerpt
from service.client.calls import Progress, _Call
from service.client.deadline import _Late, _left, _within
from service.client.events import _Events

MAX_RETRY_AFTER_S = 30.0  # longest wait a Retry-After may ask for
Answer = Callable[[_Call, httpx.Response, _Body], Any]  # a body read whole -> the call's result


class _Retry:
    def __init__(self, retries: int, backoff: float, max_retry_after: float) -> None:
        self.retries, self.backoff, self.max_retry_after = retries, backoff, max_retry_after

    def delay(self, attempt: int, resp: httpx.Response | None) -> float | None:
        """Seconds to wait before the next attempt, or None to give up: a 503's Retry-After (capped at
        max_retry_after; not a finite number of seconds: the backoff), else the backoff, never past
        the call's deadline."""
        if attempt >= self.retries or (resp is not None and resp.status_code != 503):
            return None
        wait = self.backoff * 2**attempt
        after = resp.headers.get("retry-after") if resp is not None else None
        if after is not None:
            try:
                asked = float(after)
            except ValueError:
                asked = math.nan
            if math.isfinite(asked):
                wait = max(0.0, asked)
        wait = min(wait, self.max_retry_after)
        left = _left()
        return None if left is not None and wait >= left else wait


class Exchange:
    """One call: the request, how its answer is taken, and its attempts so far."""

    def __init__(self, method: str, path: str, kwargs: dict[str, Any], call: _Call, *, retry: _Retry, limit: int,
                 to: Path | None = None, answer: Answer | None = None, on_progress: Progress | None = None) -> None:
        self.method, self.path, self.kwargs, self.call = method, path, kwargs, call
        self.retry, self.limit, self.to, self.answer, self.on_progress = retry, limit, to, answer, on_progress
        self.attempt = 0

    def answered(self, resp: httpx.Response) -> Reading | float:
        """The reading of this answer, or the seconds to wait before sending again (a 503)."""
        wait = self.retry.delay(self.attempt, resp)
        if wait is not None:
            self.attempt += 1
            return wait
        body = _Body.of(resp, self.limit, self.to)
        if self.on_progress is not None:
            return EventReading(self.call, resp, body, self.on_progress, self.limit)
        return Reading(self.call, resp, body, self.answer)

    def failed(self, e: httpx.HTTPError) -> float:
        """The seconds to wait before sending again after a failed connection; else the error it is."""
        if isinstance(e, httpx.DecodingError):  # a Content-Encoding that does not decode
            raise AnswerError(502, f"the answer's body does not decode: {_excerpt(str(e))}") from None
        left = _left()
        if left is not None and left <= 0:
            raise _Late() from None
        wait = self.retry.delay(self.attempt, None)
        if wait is None:
            raise _transport_failure(e) from None
        self.attempt += 1
        return wait


class Reading:
    """An answer's body, fed chunk by chunk (`feed` is True when no more is needed), then `finish`ed into
    the call's result; `close` drops what a result did not keep."""

    def __init__(self, call: _Call, resp: httpx.Response, body: _Body, answer: Answer | None) -> None:
        self.call, self.resp, self.body, self.answer = call, resp, body, answer

    def feed(self, chunk: bytes) -> bool:
        return self.body.take(chunk)

    def finish(self) -> Any:
        return self.answer(self.call, self.resp, self.body)

    def close(self) -> None:
        self.body.discard()


class EventReading(Reading):
    """Server-sent events: progress called back as it comes, the result event the call's result. An error
    status is read as any other error's body."""

    def __init__(self, call: _Call, resp: httpx.Response, body: _Body, on_progress: Progress, limit: int) -> None:
        super().__init__(call, resp, body, None)
        self.events = None
        if body.ok:
            _check_stream(resp, body)
            self.events = _Events(call, on_progress, limit)
        self.done = False

    def feed(self, chunk: bytes) -> bool:
        if self.events is None:
            return self.body.take(chunk)
        self.done = self.events.feed_bytes(chunk)
        return self.done

    def finish(self) -> Any:
        if self.events is None:
            _check_status(self.resp, self.body)  # an error: raises ServiceError with its detail
        if not self.done:
            raise AnswerError(502, "the stream ended without a result")
        return self.events.result


@contextlib.contextmanager
def within_deadline(seconds: float, *late: type[BaseException]) -> Iterator[None]:
    """A call within `seconds`: its deadline passed (or one of `late` raised) is an AnswerError 504."""
    with _within(seconds):
        try:
            yield
        except (_Late, *late):
            raise AnswerError(504, f"no complete answer within the deadline of {seconds:g} s") from None


def _transport_failure(e: httpx.TransportError) -> Exception:
    """A connection that could not be made stays what it is (the CLI: cannot reach); one that
    broke or spoke nonsense once made is an answer that did not come whole."""
    if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol)):
        return e
    return AnswerError(502, f"the answer did not come whole: {type(e).__name__}: {_excerpt(str(e))}")
