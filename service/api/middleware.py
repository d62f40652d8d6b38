"""One pure-ASGI middleware for what every request goes through, in this order:

1. X-Request-ID: taken from the request when sane, else generated; put on every answer (errors
   and health included) and, through a ContextVar, on every log line of the request.
2. API key: when configured, everything but /healthz, /readyz and the explorer page's own files
   (`/`, `/explorer/...`: they hold no data; the page sends the key on its API calls) needs
   exactly one X-API-Key header, matching (two are ambiguous: 401 whatever their order). With
   CORS origins configured, a browser's preflight (OPTIONS with Origin and
   Access-Control-Request-Method, which never carries the key) goes on to the CORS middleware,
   which answers it without reaching a route. A scope that is not HTTP is refused (a websocket
   is closed before it is accepted); only the lifespan passes.
3. Body limit: a Content-Length over the limit is refused before reading; a body that streams
   past the limit is cut off with 413, never read whole into memory. Body bytes are taken from
   a budget shared by all requests (503 + Retry-After when it is spent).
4. Read timeout: each next piece of the body must come within --read-timeout-s (else 408); an
   answer given before the body was read to its end closes the connection, so that the rest
   of a body cannot hold it. (Headers are timed by service/http.py.) The timer is for the body
   only: once it has been read, `receive` waits for the client's disconnect as long as the
   answer takes (a server-sent event stream listens for it), and one watcher does the waiting,
   so that work in threads stops when the client leaves (budget.Lease.stop, check_deadline).
5. Deadline: the request runs in its own task under --request-timeout-s; past it (plus a
   grace) the answer is 504 even while a worker thread cannot be interrupted, and that work
   stops at its next deadline check (service/budget.py). The request's budgets are given back
   when its task has ended, not before; after a 504 or a disconnect that is at the work's next
   check.
6. Access log line and request metrics (by route template, so cardinality stays bounded);
   every client-controlled field is escaped (`esc`), so a path with %0d%0a cannot forge lines.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid

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
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = headers.get("x-request-id", "")
        rid = rid if _SANE_ID.match(rid) else uuid.uuid4().hex
        token = request_id.set(rid)
        started = time.perf_counter()
        status = {"code": 500}
        admission = _admission(scope)
        lease = budget.Lease()
        due = time.monotonic() + admission.request_timeout_s if admission else None
        tokens = (budget.deadline.set(due), budget.lease.set(lease))
        has_body = headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers
        state = {"body_done": not has_body, "answered": False, "started": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                if state["answered"]:
                    raise _Answered()
                state["started"] = True
                status["code"] = message["status"]
                extra = [(b"x-request-id", rid.encode())]
                if not state["body_done"]:
                    # the body was not read to its end: close, so that its rest cannot hold the
                    # connection (a Content-Length longer than what comes, a trickled body)
                    extra.append((b"connection", b"close"))
                message["headers"] = [*message.get("headers", []), *extra]
            elif state["answered"] and not state["started"]:
                raise _Answered()
            await send(message)

        task, spawned = None, False
        try:
            refusal = self._refuse(scope, headers)
            if refusal is None and admission is not None:
                refusal = await self._take_body_budget(admission, headers, lease)
            if refusal is not None:
                await _json(send_with_id, *refusal)
                return
            task = asyncio.ensure_future(self._call_limited(scope, receive, send_with_id, admission, lease, state))
            spawned = True
            task.add_done_callback(lambda _t: lease.end())  # budgets come back when no work is left
            if due is None:
                await task
                return
            await asyncio.wait({task}, timeout=max(0.0, due - time.monotonic()) + _GRACE_S)
            if not task.done() and not state["started"]:
                # The work is in a thread that cannot be interrupted (it stops at its next deadline
                # check): answer now, and let the task finish on its own, its answer discarded.
                state["answered"] = True
                lease.stop("the request was answered 504")
                await _json(send, 504, f"the request took longer than {admission.request_timeout_s:g} s",
                            extra=[(b"x-request-id", rid.encode()), (b"connection", b"close")])
                status["code"] = 504
                _orphans.add(task)
                task.add_done_callback(_orphans.discard)
                task = None
            else:
                await task
        except asyncio.CancelledError:
            lease.stop("the request was cancelled")
            if task is not None and not task.done():
                task.cancel()
            raise
        finally:
            if not spawned:
                lease.end()  # else the task gives the lease back when it ends (an orphan too)
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(elapsed)
            log.info("%s %s %d %.1fms", esc(scope["method"], 16), esc(scope["path"]), status["code"], elapsed * 1000)
            for var, tok in zip((budget.deadline, budget.lease), tokens):
                var.reset(tok)
            request_id.reset(token)

    def _refuse(self, scope: Scope, headers: dict[str, str]) -> tuple | None:
        path = scope["path"]
        if self.api_key is not None and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES) \
                and not (self.cors and _is_preflight(scope, headers)):
            given = [v for k, v in scope["headers"] if k.lower() == b"x-api-key"]
            if len(given) > 1:
                return 401, "more than one X-API-Key header"
            if not given or not hmac.compare_digest(given[0], self.api_key):
                return 401, "missing or wrong X-API-Key"
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit() or len(length) > 18:
                return 400, "malformed Content-Length"
            if int(length) > self.max_body:
                return 413, f"the request body is {length} bytes, more than the limit of {self.max_body}"
        return None

    async def _take_body_budget(self, admission: Admission, headers: dict[str, str], lease: budget.Lease):
        """A declared body takes its bytes from the shared budget before it is read (a body without
        Content-Length takes them as it streams, see _call_limited)."""
        length = int(headers.get("content-length") or 0)
        if length:
            try:
                await lease.take(admission.body_bytes, length, admission.wait_s())
            except budget.Busy as e:
                return 503, str(e), [(b"retry-after", str(RETRY_AFTER_S).encode())]
        return None

    async def _call_limited(self, scope: Scope, receive: Receive, send: Send, admission: Admission | None,
                            lease: budget.Lease, state: dict) -> None:
        seen = 0
        declared = "content-length" in {k.decode("latin-1").lower() for k, _ in scope["headers"]}
        read_timeout = admission.read_timeout_s if admission is not None else None
        gone = asyncio.Event()  # the client disconnected, seen by the body read or by `watch`
        watcher: asyncio.Task | None = None  # started once the app has had the body's last message

        async def watch() -> None:
            """After the body, the only message left is the disconnect: wait for it here, once,
            and stop the request's work when it comes (threads stop at their next check)."""
            while (await receive())["type"] != "http.disconnect":
                pass
            lease.stop("the client disconnected")
            gone.set()

        def body_read() -> None:
            nonlocal watcher
            state["body_done"] = True
            if watcher is None:
                watcher = asyncio.ensure_future(watch())

        async def limited_receive() -> Message:
            nonlocal seen
            if watcher is not None:  # no timer: an answer (a stream) may take as long as the request may
                await gone.wait()
                return {"type": "http.disconnect"}
            try:
                async with asyncio.timeout(read_timeout):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout() from None
            if message["type"] == "http.disconnect":
                lease.stop("the client disconnected")
                gone.set()
            elif message["type"] == "http.request":
                chunk = len(message.get("body", b""))
                seen += chunk
                if seen > self.max_body:
                    raise BodyTooLarge()
                if chunk and not declared and admission is not None:
                    if not admission.body_bytes.try_take(chunk):
                        raise budget.Busy("the service holds its limit of request body bytes at once; "
                                          "try again shortly")
                    lease.hold(admission.body_bytes, chunk)
                if not message.get("more_body", False):
                    body_read()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _Answered:
            pass
        except BodyTooLarge:
            if not state["started"]:
                await _json(send, 413, f"the request body is larger than the limit of {self.max_body} bytes")
        except BodyTimeout:
            if not state["started"]:
                await _json(send, 408, f"the request body stopped arriving (nothing for {read_timeout:g} s)")
        except budget.Busy as e:
            if not state["started"]:
                await _json(send, 503, str(e), extra=[(b"retry-after", str(RETRY_AFTER_S).encode())])
        except Exception:  # a bug: log it here, answer without a stack trace
            logging.getLogger("service").exception("unhandled error in %s %s", esc(scope["method"], 16),
                                                   esc(scope["path"]))
            if not state["started"]:
                await _json(send, 500, "internal error; the request id is in X-Request-ID")
        finally:
            if watcher is not None:
                watcher.cancel()


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
