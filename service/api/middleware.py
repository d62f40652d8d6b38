"""One pure-ASGI middleware for what every request goes through, in four stages, in this order
(`RequestMiddleware.__call__` names them; each is a method of its own below):

1. Request id and log line: X-Request-ID taken from the request when sane, else generated; put on
   every answer (errors and health included) and, through a ContextVar, on every log line of the
   request. At the end, the access log line and request metrics (by route template, so cardinality
   stays bounded); every client-controlled field is escaped (`esc`), so a path with %0d%0a cannot
   forge lines.
2. API key: when configured, everything but /healthz, /readyz and the explorer page's own files
   (`/`, `/explorer/...`: they hold no data; the page sends the key on its API calls) needs
   exactly one X-API-Key header, matching (two are ambiguous: 401 whatever their order). With
   CORS origins configured, a browser's preflight (OPTIONS with Origin and
   Access-Control-Request-Method, which never carries the key) goes on to the CORS middleware,
   which answers it without reaching a route. A scope that is not HTTP is refused (a websocket
   is closed before it is accepted); only the lifespan passes.
3. Body limits and read timeout: a Content-Length over the limit is refused before reading; a body
   that streams past the limit is cut off with 413, never read whole into memory. Body bytes are
   taken from a budget shared by all requests (503 + Retry-After when it is spent). Each next piece
   of the body must come within --read-timeout-s (else 408); an answer given before the body was
   read to its end closes the connection, so that the rest of a body cannot hold it. (Headers are
   timed by service/http.py.) The timer is for the body only (`_Body`).
4. Deadline and disconnect: the request runs in its own task under --request-timeout-s; past it
   (plus a grace) the answer is 504 even while a worker thread cannot be interrupted, and that work
   stops at its next deadline check (service/budget.py). Once the body has been read, `receive`
   waits for the client's disconnect as long as the answer takes (a server-sent event stream
   listens for it), and one watcher does the waiting, so that work in threads stops when the client
   leaves (budget.Lease.stop, check_deadline). The request's budgets are given back when its task
   has ended, not before; after a 504 or a disconnect that is at the work's next check.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import budget
from service.api.admission import Admission, admission_for
from service.config import RETRY_AFTER_S
from service.logs import request_id
from service.metrics import Metrics

log = logging.getLogger("service.access")

_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})
OPEN_PREFIXES = ("/explorer/",)  # the explorer page's static files (service/api/explorer.py)


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    """The client stopped sending its body (408). Not a TimeoutError: that one means 504."""


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\\]")


def esc(value: object, limit: int = 512) -> str:
    """A client-controlled value as it may appear in a log line: control characters (CR, LF, tab,
    escape, C1, Unicode line separators) and backslashes written as escapes, so that no value can
    start a forged log line; long values are cut."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return _CONTROL.sub(_escape_one, text)


def _escape_one(m: re.Match) -> str:
    c = m.group()
    if c == "\\":
        return "\\\\"
    return f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"


_orphans: set[asyncio.Task] = set()  # requests answered 504 whose work has not finished yet


class _Request:
    """One HTTP request as the stages see it: its id and headers, its admission (limits), its budgets
    (`lease`), its deadline, and how far its answer has gone."""

    def __init__(self, scope: Scope, send: Send) -> None:
        self.scope, self.raw_send = scope, send
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = self.headers.get("x-request-id", "")
        self.rid = rid if _SANE_ID.match(rid) else uuid.uuid4().hex
        self.admission = _admission(scope)
        self.lease = budget.Lease()
        self.due = time.monotonic() + self.admission.request_timeout_s if self.admission else None
        has_body = self.headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in self.headers
        self.body_done = not has_body  # the app has had the body's last message
        self.started = False  # the answer's status line has been sent
        self.answered = False  # the middleware answered (504) before the app did
        self.spawned = False  # a task runs the app: it gives the lease back when it ends
        self.code = 500  # the answer's status, for the log line and the metrics

    async def send(self, message: Message) -> None:
        """The app's answer, with the request id (and `Connection: close` when the body was not read to
        its end); dropped once the middleware has answered."""
        if message["type"] == "http.response.start":
            if self.answered:
                raise _Answered()
            self.started = True
            self.code = message["status"]
            extra = [(b"x-request-id", self.rid.encode())]
            if not self.body_done:
                # the body was not read to its end: close, so that its rest cannot hold the
                # connection (a Content-Length longer than what comes, a trickled body)
                extra.append((b"connection", b"close"))
            message["headers"] = [*message.get("headers", []), *extra]
        elif self.answered and not self.started:
            raise _Answered()
        await self.raw_send(message)


class RequestMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body: int, api_key: str | None,
                 cors: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body
        if api_key is not None and not api_key.strip():
            raise ValueError("the API key is empty or blank: refusing to serve without authentication")
        self.api_key = api_key.encode() if api_key is not None else None
        self.cors = cors  # CORS origins are configured: preflights go on to the CORS middleware

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            await _refuse_scope(scope, receive, send)
            return
        req = _Request(scope, send)
        with self._identified_and_logged(req):  # 1
            refusal = self._check_key(req) or self._check_length(req)  # 2, 3
            if refusal is None and req.admission is not None:
                refusal = await self._take_body_budget(req)  # 3
            if refusal is not None:
                await _json(req.send, *refusal)
                return
            await self._within_deadline(req, receive)  # 3 (the body as it streams), 4

    # -- 1. request id and log line ----------------------------------------------------------------
    @contextlib.contextmanager
    def _identified_and_logged(self, req: _Request) -> Iterator[None]:
        """The request's id, deadline and budgets in context for everything it runs; at its end, the
        budgets given back (unless its task holds them), the metrics and the access log line."""
        tokens = [(var, var.set(value)) for var, value in
                  ((request_id, req.rid), (budget.deadline, req.due), (budget.lease, req.lease))]
        started = time.perf_counter()
        try:
            yield
        finally:
            if not req.spawned:
                req.lease.end()  # else the task gives the lease back when it ends (an orphan too)
            elapsed = time.perf_counter() - started
            endpoint = getattr(req.scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint=endpoint, status=str(req.code)).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(elapsed)
            log.info("%s %s %d %.1fms", esc(req.scope["method"], 16), esc(req.scope["path"]), req.code,
                     elapsed * 1000)
            for var, tok in reversed(tokens):
                var.reset(tok)

    # -- 2. API key ---------------------------------------------------------------------------------
    def _check_key(self, req: _Request) -> tuple | None:
        path = req.scope["path"]
        if self.api_key is None or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES) \
                or (self.cors and _is_preflight(req.scope, req.headers)):
            return None
        given = [v for k, v in req.scope["headers"] if k.lower() == b"x-api-key"]
        if len(given) > 1:
            return 401, "more than one X-API-Key header"
        if not given or not hmac.compare_digest(given[0], self.api_key):
            return 401, "missing or wrong X-API-Key"
        return None

    # -- 3. body limits and read timeout ------------------------------------------------------------
    def _check_length(self, req: _Request) -> tuple | None:
        length = req.headers.get("content-length")
        if length is None:
            return None
        if not length.isdigit() or len(length) > 18:
            return 400, "malformed Content-Length"
        if int(length) > self.max_body:
            return 413, f"the request body is {length} bytes, more than the limit of {self.max_body}"
        return None

    async def _take_body_budget(self, req: _Request) -> tuple | None:
        """A declared body takes its bytes from the shared budget before it is read (a body without
        Content-Length takes them as it streams, see _Body)."""
        length = int(req.headers.get("content-length") or 0)
        if length:
            try:
                await req.lease.take(req.admission.body_bytes, length, req.admission.wait_s())
            except budget.Busy as e:
                return 503, str(e), [(b"retry-after", str(RETRY_AFTER_S).encode())]
        return None

    async def _call_app(self, req: _Request, receive: Receive) -> None:
        """The app, reading the body through _Body; what _Body raises becomes its answer (unless the
        app's own has started)."""
        body = _Body(req, receive, self.max_body)
        send = req.send
        try:
            await self.app(req.scope, body.receive, send)
        except _Answered:
            pass
        except BodyTooLarge:
            if not req.started:
                await _json(send, 413, f"the request body is larger than the limit of {self.max_body} bytes")
        except BodyTimeout:
            if not req.started:
                await _json(send, 408, f"the request body stopped arriving (nothing for {body.read_timeout:g} s)")
        except budget.Busy as e:
            if not req.started:
                await _json(send, 503, str(e), extra=[(b"retry-after", str(RETRY_AFTER_S).encode())])
        except Exception:  # a bug: log it here, answer without a stack trace
            logging.getLogger("service").exception("unhandled error in %s %s", esc(req.scope["method"], 16),
                                                   esc(req.scope["path"]))
            if not req.started:
                await _json(send, 500, "internal error; the request id is in X-Request-ID")
        finally:
            body.close()

    # -- 4. deadline and disconnect -----------------------------------------------------------------
    async def _within_deadline(self, req: _Request, receive: Receive) -> None:
        """The app in its own task; past the deadline (plus a grace) a 504 while its work, in a thread that
        cannot be interrupted, stops at its next deadline check. A cancelled request stops its work."""
        task = asyncio.ensure_future(self._call_app(req, receive))
        req.spawned = True
        task.add_done_callback(lambda _t: req.lease.end())  # budgets come back when no work is left
        try:
            if req.due is None:
                await task
                return
            await asyncio.wait({task}, timeout=max(0.0, req.due - time.monotonic()) + _GRACE_S)
            if task.done() or req.started:
                await task
                return
            # answer now, and let the task finish on its own, its answer discarded
            req.answered = True
            req.lease.stop("the request was answered 504")
            await _json(req.raw_send, 504, f"the request took longer than {req.admission.request_timeout_s:g} s",
                        extra=[(b"x-request-id", req.rid.encode()), (b"connection", b"close")])
            req.code = 504
            _orphans.add(task)
            task.add_done_callback(_orphans.discard)
        except asyncio.CancelledError:
            req.lease.stop("the request was cancelled")
            if not task.done() and task not in _orphans:
                task.cancel()
            raise


class _Body:
    """The request body as the app reads it (stage 3): within the size limit and the shared budget of
    body bytes, each next piece within the read timeout; once read, `receive` waits for the client's
    disconnect (one watcher, which stops the request's work when it comes)."""

    def __init__(self, req: _Request, receive: Receive, max_body: int) -> None:
        self.req, self._receive, self.max_body = req, receive, max_body
        self.seen = 0
        self.declared = "content-length" in req.headers
        self.read_timeout = req.admission.read_timeout_s if req.admission is not None else None
        self.gone = asyncio.Event()  # the client disconnected, seen by the body read or by the watcher
        self.watcher: asyncio.Task | None = None  # started once the app has had the body's last message

    async def receive(self) -> Message:
        if self.watcher is not None:  # no timer: an answer (a stream) may take as long as the request may
            await self.gone.wait()
            return {"type": "http.disconnect"}
        try:
            async with asyncio.timeout(self.read_timeout):
                message = await self._receive()
        except TimeoutError:
            raise BodyTimeout() from None
        if message["type"] == "http.disconnect":
            self.req.lease.stop("the client disconnected")
            self.gone.set()
        elif message["type"] == "http.request":
            self._count(len(message.get("body", b"")))
            if not message.get("more_body", False):
                self.req.body_done = True
                if self.watcher is None:
                    self.watcher = asyncio.ensure_future(self._watch())
        return message

    def _count(self, chunk: int) -> None:
        self.seen += chunk
        if self.seen > self.max_body:
            raise BodyTooLarge()
        admission = self.req.admission
        if chunk and not self.declared and admission is not None:
            if not admission.body_bytes.try_take(chunk):
                raise budget.Busy("the service holds its limit of request body bytes at once; try again shortly")
            self.req.lease.hold(admission.body_bytes, chunk)

    async def _watch(self) -> None:
        """After the body, the only message left is the disconnect: wait for it here, once, and stop
        the request's work when it comes (threads stop at their next check)."""
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.req.lease.stop("the client disconnected")
        self.gone.set()

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()


class _Answered(Exception):
    """The middleware answered (504) before the app did: the app's late answer is dropped."""


_GRACE_S = 0.25  # the app's own 504 comes first when it can; this one when its work cannot stop


def _is_preflight(scope: Scope, headers: dict[str, str]) -> bool:
    """A CORS preflight as the CORS middleware recognises (and answers) it."""
    return scope["method"] == "OPTIONS" and "origin" in headers and "access-control-request-method" in headers


async def _refuse_scope(scope: Scope, receive: Receive, send: Send) -> None:
    """No route takes a websocket (or any scope but HTTP and lifespan): close it before it is
    accepted (the server answers the handshake 403), so nothing passes the checks above unseen."""
    if scope["type"] == "websocket":
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.close", "code": 1008, "reason": "this service has no websocket endpoints"})
    log.warning("refused a %s scope at %s", esc(scope["type"], 32), esc(scope.get("path", "-")))


def _admission(scope: Scope) -> Admission | None:
    app = scope.get("app")
    if app is None or getattr(app.state, "ctx", None) is None:
        return None
    return admission_for(app)


async def _json(send: Send, status: int, detail: str, extra: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(extra or [])]})
    await send({"type": "http.response.body", "body": body})
