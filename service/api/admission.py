"""Admission: the budgets shared by all of an app's requests, which a request takes its share of
before the work that holds it (service/budget.py): the pixels decoded or drawn at once and the
request body bytes held at once, and the forward passes of faithfulness scoring committed at once;
a request waits up to ADMISSION_WAIT_S for its share, then 503 +
Retry-After. And the timeouts a request runs under (service/api/middleware.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service import budget
from service.budget import Budget

ADMISSION_WAIT_S = 5.0  # longest wait for a share of a budget before 503 + Retry-After


@dataclass
class Admission:
    """The app's shared budgets (one set per app, made from its settings on first use)."""

    pixels: Budget  # pixels of decoded images (and of what is drawn from them) held at once
    body_bytes: Budget  # request body bytes held at once
    forwards: Budget  # forward passes of faithfulness scoring committed at once
    request_timeout_s: float
    read_timeout_s: float

    def wait_s(self) -> float:
        left = budget.remaining()
        return ADMISSION_WAIT_S if left is None else max(0.0, min(ADMISSION_WAIT_S, left - 0.5))

    async def take_pixels(self, n: int) -> None:
        lease = budget.lease.get()
        if lease is not None:  # outside the middleware (unit tests) nothing is accounted
            await lease.take(self.pixels, n, self.wait_s())

    async def take_forwards(self, n: int) -> None:
        """The model's forward passes the request's faithfulness scoring will run: refused (413) when they
        can never fit, else waited for (503 past ADMISSION_WAIT_S) and held until the request's work ends."""
        lease = budget.lease.get()
        if lease is not None and n > 0:
            await lease.take(self.forwards, n, self.wait_s())


def admission_for(app: Any) -> Admission:
    admission = getattr(app.state, "admission", None)
    if admission is None:
        s = app.state.ctx.settings
        admission = Admission(
            pixels=Budget(s.pixels_in_flight, "pixels", "--max-pixels-in-flight"),
            body_bytes=Budget(s.body_bytes_in_flight, "bytes of request bodies", "--max-bodies-mb"),
            forwards=Budget(s.max_forwards_in_flight,
                            "forward passes of faithfulness scoring (images x frames x settings x (steps + 1) x 2)",
                            "--max-forwards-in-flight"),
            request_timeout_s=s.request_timeout_s,
            read_timeout_s=s.read_timeout_s,
        )
        app.state.admission = admission
    return admission
