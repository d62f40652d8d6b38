"""Prometheus metrics, one registry per app (so that several apps in one process never collide).

With `--workers N` the supervisor (service/workers.py) sets PROMETHEUS_MULTIPROC_DIR before it
starts the server processes: prometheus_client then keeps every value in a file per process,
and any process's /metrics answers the host's totals (counters and histograms summed over the
processes, dead ones included, so totals never go back; the queue depth summed over the live
ones; each live process's model status with a `pid` label).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vit_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram(
            "vit_request_duration_seconds", "HTTP request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "vit_queue_wait_seconds", "time an image waited in its model's queue", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "vit_batch_size", "images per batch run by the engine", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "vit_inference_seconds", "engine time per batch", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("vit_queue_depth", "images waiting in the model's queue", ["model"], registry=r,
                                 multiprocess_mode="livesum")
        self.model_ready = Gauge(
            "vit_model_status", "1 for the model's current status, 0 for the others", ["model", "status"], registry=r,
            multiprocess_mode="liveall",
        )

    def set_status(self, model: str, status: str) -> None:
        for s in ("loading", "ready", "unavailable"):
            self.model_ready.labels(model=model, status=s).set(1 if s == status else 0)

    def observe_batch(self, model: str, waits: list[float], seconds: float) -> None:
        self.batch_size.labels(model=model).observe(len(waits))
        self.inference.labels(model=model).observe(seconds)
        for w in waits:
            self.queue_wait.labels(model=model).observe(w)

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)
