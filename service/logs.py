"""Log set-up shared by every way the service runs (python -m service serve, --workers, Ray Serve
replicas): each line carries its request's id (the X-Request-ID that service/api/middleware.py
sets for the request), as text or as one JSON object per line (--log-json)."""

from __future__ import annotations

import contextvars
import json
import logging

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


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


def configure_logging(level: str, as_json: bool, logger: str | None = None) -> None:
    """One stderr handler with the request id, on the root logger; with `logger` ("service", in a
    Ray Serve replica) on that logger only, not propagated, so that the root logger stays the host's."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter(TEXT_FORMAT))
    target = logging.getLogger(logger)
    target.handlers[:] = [handler]
    target.setLevel(level.upper())
    if logger is not None:
        target.propagate = False
