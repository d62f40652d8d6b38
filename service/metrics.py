"""Prometheus metrics, one registry per app (so that several apps in one process never collide).

With `--workers N` the supervisor (service/workers.py) sets PROMETHEUS_MULTIPROC_DIR before it
starts the server processes: prometheus_client then keeps every value in a file per process,
and any process's /metrics answers the host's totals (counters and histograms summed over the
processes, dead ones included, so totals never go back; the queue depth summed over the live
ones; each live process's model status with a `pid` label).

A dead process's files do not stay (`retire`, called by the supervisor when a child exits): its
live gauges are dropped (prometheus_client's mark_process_dead) and its counter and histogram
values are added into one file per type named `dead` instead of a pid, then its files are removed.
The directory thus holds at most one file per type and live process plus the `dead` ones, however
many children died. A scrape reads the directory under a shared lock, the merge holds it
exclusively: no scrape sees a dead child's counts twice or not at all.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.mmap_dict import MmapedDict

# The multiprocess file types whose values add up over processes (a histogram's buckets, sum and
# count are stored per process as plain sums); the aggregate of the dead takes "dead" as its pid.
SUMMED = ("counter", "histogram", "summary")
DEAD = "dead"
LOCK = ".lock"  # not a *.db file: the collector never reads it

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
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory:
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            with _locked(directory, exclusive=False):
                return generate_latest(merged)
        return generate_latest(self.registry)


@contextlib.contextmanager
def _locked(directory: str, exclusive: bool) -> Iterator[None]:
    import fcntl  # POSIX only, as --workers is

    fd = os.open(os.path.join(directory, LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def retire(pid: int, directory: str) -> None:
    """A dead process's metric files -> its live gauges dropped, its counter and histogram values
    added into the `dead` file of their type; none of its files left (see the module's doc)."""
    multiprocess.mark_process_dead(pid, directory)
    with _locked(directory, exclusive=True):
        for kind in SUMMED:
            path = os.path.join(directory, f"{kind}_{pid}.db")
            if not os.path.exists(path):
                continue
            dead = os.path.join(directory, f"{kind}_{DEAD}.db")
            work = dead + ".new"  # not *.db: merged aside, then put in place at once
            try:
                if os.path.exists(dead):
                    shutil.copyfile(dead, work)
                into = MmapedDict(work)
                try:
                    for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(path):
                        total, _ = into.read_value(key)
                        into.write_value(key, total + value, timestamp)
                finally:
                    into.close()
                os.replace(work, dead)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(work)
            os.unlink(path)
