"""uvicorn's httptools protocol with the connection limits uvicorn does not have.

uvicorn bounds an idle keep-alive connection (`timeout_keep_alive`) and can answer 503 past
`limit_concurrency`, but a connection still costs a file handle from accept to close, and
nothing times the arrival of a request's headers (h11's `max_incomplete_event_size` bounds their
size with the h11 parser only; httptools has a fixed one of its own). So, per connection:

- Connection limit: at most `max_connections` stay open, so that floods of connections cannot
  exhaust the file handles. A connection accepted beyond it evicts the connection that has been
  idle longest (waiting for its request's headers: 408, or an idle keep-alive one), so that a
  client that sends its request at once (a health probe) is served even while slow or idle
  clients hold every connection; when every connection is busy with a request, the new one is
  answered 503 (with Retry-After) and closed, a clear refusal instead of a dropped connection.
- Header timeout: from the connection's start, and from the first byte of each next request,
  the request line and headers must be complete within `header_timeout` (else 408 and close):
  a slowloris trickle of one byte a second holds a connection for that long, not forever.
- Header size: more than `max_header_bytes` before the headers are complete: 431 and close.
- Slow readers: after an answer, a client that reads none of it for `header_timeout` is dropped,
  so its buffered answer does not stay in memory.

Body timeouts are the ASGI middleware's (service/api/middleware.py).

This hooks uvicorn's httptools protocol, which is not a public API: pyproject.toml pins the
uvicorn versions it was tested with (TESTED_UVICORN), a version outside them is named in a warning
at start, and a uvicorn whose protocol lacks a hook or the state used here refuses to start
(`check_uvicorn`). Where this protocol is not the one serving (h11 without httptools, Ray Serve's
proxy) a warning at start names what is unguarded; docs/proxy.md has the proxy settings for that.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from service.config import RETRY_AFTER_S

log = logging.getLogger("service.http")

# uvicorn versions this protocol was tested with: >= the first, < the second (as pyproject.toml pins)
TESTED_UVICORN = ((0, 54), (0, 55))
# what GuardedHttpToolsProtocol overrides, and the protocol's state it reads
HOOKS = ("connection_made", "connection_lost", "data_received", "on_message_begin", "on_headers_complete",
         "on_response_complete")
STATE = ("loop", "connections", "transport", "pipeline", "cycle")

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


def raw_response(status: int, detail: str, retry_after: int | None = None) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    head = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Error")), b"content-type: application/json",
            b"content-length: %d" % len(body), b"connection: close"]
    if retry_after is not None:
        head.append(b"retry-after: %d" % retry_after)
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def check_uvicorn(version: str = uvicorn.__version__, protocol: type = HttpToolsProtocol) -> None:
    """Refuse (ValueError) a uvicorn whose httptools protocol lacks a method this module overrides
    or the state it reads, so that the guards never fail quietly, or per connection; warn when
    the version is outside the tested range (the guards may still work, or be subtly off)."""
    missing = [h for h in HOOKS if not callable(getattr(protocol, h, None))]
    loop = asyncio.new_event_loop()
    try:
        config = uvicorn.Config(app=_no_app, log_config=None)
        instance = protocol(config=config, server_state=ServerState(), app_state={}, _loop=loop)
        missing += [f"self.{name}" for name in STATE if not hasattr(instance, name)]
    except Exception as e:  # noqa: BLE001 - any failure to build one means the hooks cannot be trusted
        missing.append(f"its constructor ({type(e).__name__}: {e})")
    finally:
        loop.close()
    lo, hi = TESTED_UVICORN
    wanted = f"uvicorn >={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}"
    if missing:
        raise ValueError(f"uvicorn {version}'s httptools protocol lacks {', '.join(missing)}, which the connection "
                         f"guards (service/http.py) hook: refusing to serve unguarded; install {wanted}")
    parts = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if not lo <= parts < hi:
        log.warning("uvicorn %s is outside the versions the connection guards (service/http.py: header timeout, "
                    "header size limit, connection limit) were tested with (%s): they hook its internals", version,
                    wanted)


async def _no_app(scope, receive, send) -> None:  # noqa: ANN001 - only to build a protocol in check_uvicorn
    raise RuntimeError("not an application")


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """Configure with `configured(...)`, which returns a subclass carrying the limits."""

    max_connections: int = 1000
    header_timeout: float = 10.0
    max_header_bytes: int = 32 * 1024

    @classmethod
    def configured(cls, *, max_connections: int, header_timeout: float, max_header_bytes: int) -> type:
        return type("GuardedHttpToolsProtocol", (cls,), {
            "max_connections": max_connections, "header_timeout": header_timeout, "max_header_bytes": max_header_bytes,
        })

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_headers = True
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._idle_since = self.loop.time()
        if len(self.connections) > self.max_connections and not self._evict_idlest():
            log.warning("connection limit (%d) reached with every connection busy: refusing a new one with 503",
                        self.max_connections)
            self._refuse(503, f"the server holds its limit of {self.max_connections} connections; try again shortly",
                         retry_after=RETRY_AFTER_S)
            return
        self._arm_header_timer()

    def _idle(self) -> bool:
        """No request of this connection is being served: it waits for headers, or is kept alive."""
        return (not self.transport.is_closing() and not self.pipeline
                and (self.cycle is None or self.cycle.response_complete))

    def _evict_idlest(self) -> bool:
        idle = [c for c in self.connections if c is not self and isinstance(c, GuardedHttpToolsProtocol) and c._idle()]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c._idle_since)
        victim._refuse(408, "closed: the server is at its connection limit and this connection had sent no request")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_headers and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                self._refuse(431, f"the request line and headers are larger than {self.max_header_bytes} bytes")

    # parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._idle_since = self.loop.time()
        self._in_headers = True
        self._header_bytes = 0
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        self._idle_since = self.loop.time()
        super().on_response_complete()
        if not self.transport.is_closing() and self.transport.get_write_buffer_size():
            self._watch_drain(self.transport.get_write_buffer_size())

    # timers
    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout)

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._in_headers and not self.transport.is_closing():
            self._refuse(408, f"the request's headers did not arrive within {self.header_timeout:g} s")

    def _watch_drain(self, size: int) -> None:
        def check() -> None:
            self._drain_timer = None
            if self.transport.is_closing():
                return
            left = self.transport.get_write_buffer_size()
            if left and left >= size:
                self.transport.close()  # not one byte read in a whole timeout: a stalled reader
            elif left:
                self._watch_drain(left)

        self._drain_timer = self.loop.call_later(self.header_timeout, check)

    def _cancel_timers(self) -> None:
        for name in ("_header_timer", "_drain_timer"):
            timer = getattr(self, name, None)
            if timer is not None:
                timer.cancel()
                setattr(self, name, None)

    def _refuse(self, status: int, detail: str, retry_after: int | None = None) -> None:
        self._cancel_timers()
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # an answer is under way on this connection: just end it
            return
        self.transport.write(raw_response(status, detail, retry_after))
        self.transport.close()
