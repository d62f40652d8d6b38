"""One pure-ASGI middleware for what every request goes through, in this order:

1. X-Request-ID: taken from the request when sane, else generated; put on every answer (errors
   and health included) and, through a ContextVar, on every log line of the request.
2. API key: when configured, everything but /healthz and /readyz needs a matching X-API-Key.
3. Body limit: a Content-Length over the limit is refused before reading; a body that streams
   past the limit is cut off with 413, never read whole into memory.
4. Access log line and request metrics (by route template, so cardinality stays bounded).
"""

from __future__ import annotations

import contextvars
import hmac
import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics

log = logging.getLogger("service.access")

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


class BodyTooLarge(Exception):
    pass


class RequestMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body: int, api_key: str | None) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = headers.get("x-request-id", "")
        rid = rid if _SANE_ID.match(rid) else uuid.uuid4().hex
        token = request_id.set(rid)
        started = time.perf_counter()
        status = {"code": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            refusal = self._refuse(scope, headers)
            if refusal is not None:
                await _json(send_with_id, *refusal)
            else:
                await self._call_limited(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(elapsed)
            log.info("%s %s %d %.1fms", scope["method"], scope["path"], status["code"], elapsed * 1000)
            request_id.reset(token)

    def _refuse(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get("x-api-key", "").encode()
            if not hmac.compare_digest(given, self.api_key):
                return 401, "missing or wrong X-API-Key"
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return 400, "malformed Content-Length"
            if int(length) > self.max_body:
                return 413, f"the request body is {length} bytes, more than the limit of {self.max_body}"
        return None

    async def _call_limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _json(send, 413, f"the request body is larger than the limit of {self.max_body} bytes")
        except Exception:  # noqa: BLE001 - a bug: log it here, answer without a stack trace
            logging.getLogger("service").exception("unhandled error in %s %s", scope["method"], scope["path"])
            if not started:
                await _json(send, 500, "internal error; the request id is in X-Request-ID")


async def _json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record (\"-\" outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record), "level": record.levelname, "logger": record.name,
            "message": record.getMessage(), "request_id": getattr(record, "request_id", "-"),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        JsonFormatter() if as_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
