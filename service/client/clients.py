"""The two clients over the typed calls (methods.py): each sends, reads and sleeps in its own way (sync or
async) and leaves every decision of the send-and-retry loop to exchange.Exchange."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from service.client.answers import MAX_ANSWER_BYTES, _get, _parse
from service.client.calls import Progress, _Call, _request_args
from service.client.deadline import DEADLINE_S
from service.client.exchange import MAX_RETRY_AFTER_S, Answer, Exchange, Reading, _Retry, within_deadline
from service.client.methods import _Methods
from service.client.transport import DeadlineTransport


def _headers(api_key: str | None) -> dict[str, str]:
    return {"X-API-Key": api_key} if api_key else {}


class _Base(_Methods):
    def __init__(self, retries: int, backoff: float, deadline: float, max_retry_after: float,
                 max_answer_bytes: int) -> None:
        self._retry = _Retry(retries, backoff, max_retry_after)
        self.deadline, self.max_answer_bytes = deadline, max_answer_bytes

    def _exchange(self, method: str, call: _Call, kwargs: dict, to: Path | None = None, answer: Answer | None = None,
                  on_progress: Progress | None = None) -> Exchange:
        return Exchange(method, call.path, kwargs, call, retry=self._retry, limit=self.max_answer_bytes, to=to,
                        answer=answer, on_progress=on_progress)

    def _get_call(self, path: str) -> Exchange:
        return self._exchange("GET", _Call(path, {}, [], "json", False), {}, answer=_get)

    def _post_call(self, call: _Call, to: Path | None) -> Exchange:
        return self._exchange("POST", call, _request_args(call), to, _parse)

    def _stream_call(self, call: _Call, on_progress: Progress) -> Exchange:
        return self._exchange("POST", call, _request_args(call, accept="text/event-stream"), on_progress=on_progress)


class Client(_Base):
    """Synchronous client. `retries`: attempts after the first on 503 or a failed connection.
    `timeout`: longest wait for each piece of an answer; `deadline`: longest a whole call may take
    (retries included); `max_answer_bytes`: the largest answer taken."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 0.5, deadline: float = DEADLINE_S,
                 max_retry_after: float = MAX_RETRY_AFTER_S, max_answer_bytes: int = MAX_ANSWER_BYTES,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=url, timeout=timeout, headers=_headers(api_key),
                                  transport=transport or DeadlineTransport())
        super().__init__(retries, backoff, deadline, max_retry_after, max_answer_bytes)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def methods(self) -> list[dict]:
        return self._run(self._get_call("/methods"))

    def models(self) -> list[dict]:
        return self._run(self._get_call("/models"))

    def _send(self, call: _Call, to: Path | None = None):
        return self._run(self._post_call(call, to))

    def _send_stream(self, call: _Call, on_progress: Progress):
        return self._run(self._stream_call(call, on_progress))

    def _run(self, ex: Exchange):
        with within_deadline(self.deadline):
            while True:
                try:
                    with self._http.stream(ex.method, ex.path, **ex.kwargs) as resp:
                        step = ex.answered(resp)
                        if isinstance(step, Reading):
                            try:
                                for chunk in resp.iter_bytes():
                                    if step.feed(chunk):
                                        break
                                return step.finish()
                            finally:
                                step.close()
                except (httpx.TransportError, httpx.DecodingError) as e:
                    step = ex.failed(e)
                time.sleep(step)


class AsyncClient(_Base):
    """Asynchronous client: the same calls, awaited, with the same deadline and limits."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 0.5, deadline: float = DEADLINE_S,
                 max_retry_after: float = MAX_RETRY_AFTER_S, max_answer_bytes: int = MAX_ANSWER_BYTES,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._http = httpx.AsyncClient(base_url=url, timeout=timeout, headers=_headers(api_key), transport=transport)
        super().__init__(retries, backoff, deadline, max_retry_after, max_answer_bytes)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def methods(self) -> list[dict]:
        return await self._run(self._get_call("/methods"))

    async def models(self) -> list[dict]:
        return await self._run(self._get_call("/models"))

    async def _send(self, call: _Call, to: Path | None = None):
        return await self._run(self._post_call(call, to))

    async def _send_stream(self, call: _Call, on_progress: Progress):
        return await self._run(self._stream_call(call, on_progress))

    async def _run(self, ex: Exchange):
        # no deadline transport here: asyncio.timeout bounds the whole call (TimeoutError: too late)
        with within_deadline(self.deadline, TimeoutError):
            async with asyncio.timeout(self.deadline):
                while True:
                    try:
                        async with self._http.stream(ex.method, ex.path, **ex.kwargs) as resp:
                            step = ex.answered(resp)
                            if isinstance(step, Reading):
                                try:
                                    async for chunk in resp.aiter_bytes():
                                        if step.feed(chunk):
                                            break
                                    return step.finish()
                                finally:
                                    step.close()
                    except (httpx.TransportError, httpx.DecodingError) as e:
                        step = ex.failed(e)
                    await asyncio.sleep(step)
