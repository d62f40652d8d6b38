"""The server-sent events of long work (activation maximization), parsed as they stream in."""

from __future__ import annotations

import json
from typing import Any

from service.client.answers import AnswerError, ServiceError, _answer, _counted, _excerpt
from service.client.calls import Progress, _Call


class _Events:
    """The server-sent events of activation maximization, line by line: progress calls back, the
    result ends the stream, an error raises ServiceError with the event's `status` (504 for the
    request timeout; 500 when it gives none). An event
    that is not the JSON it should be, a line or a stream past the size limit: AnswerError."""

    def __init__(self, call: _Call, on_progress: Progress, limit: int) -> None:
        self.call, self.on_progress, self.limit = call, on_progress, limit
        self.event: str | None = None
        self.result: Any = None
        self.pending = b""
        self.size = 0

    def feed_bytes(self, chunk: bytes) -> bool:
        """True once the result has come."""
        self.size = _counted(self.size, chunk, self.limit, "the event stream")
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        return any(self.feed(line.rstrip(b"\r").decode("utf-8", "replace")) for line in lines)

    def feed(self, line: str) -> bool:
        if line.startswith("event:"):
            self.event = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            try:
                data = json.loads(line.removeprefix("data:"))
            except ValueError:
                raise AnswerError(502, f"a {self.event} event's data is not JSON: {_excerpt(line, 80)!r}") from None
            if not isinstance(data, dict):
                raise AnswerError(502, f"a {self.event} event's data is not a JSON object")
            if self.event == "progress":
                step, value = data.get("step"), data.get("objective")
                if not isinstance(step, int) or not (value is None or isinstance(value, (int, float))):
                    raise AnswerError(502, f"a progress event without its step and objective: {_excerpt(line, 80)!r}")
                self.on_progress(step, value)
            elif self.event == "result":
                self.result = _answer(self.call, data)
                return True
            elif self.event == "error":
                status = data.get("status")  # the status the answer would have had (504: the request timeout)
                ok = isinstance(status, int) and not isinstance(status, bool) and 400 <= status < 600
                raise ServiceError(status if ok else 500, data.get("detail"))
        return False
