"""`--workers N`: N server processes on one port, each a whole server of its own (docs/workers.md).

The parent supervises and serves nothing. It checks that the port is free, reserves it with a
bound socket that never listens, and starts N processes (multiprocessing's spawn: no torch or
thread state is forked). Each builds its app with the same Settings (service/server.py serve):
its own model pool, queue, budgets and connection limit, with the CPU cores split between the
processes (service/runtime.py worker_cores). Only then does it open its own listening socket on
the port with SO_REUSEPORT, and the kernel spreads new connections over the listening sockets
by a hash of their addresses. One socket shared by every process would instead let whichever
process wakes first accept a whole burst of connections, and keep-alive clients would stay on it.

- SIGTERM or SIGINT to the parent: SIGTERM to every child, which drains as a single server does
  (readiness 503, accepted requests finish, the listening socket closes); the parent exits 0 when
  every child did. A second signal is passed on too, which makes the children stop at once.
- A child that dies after it started listening is started again (its connections are lost; new
  ones go to the others meanwhile); more than MAX_RESTARTS in RESTART_WINDOW_S and the parent
  stops the rest and exits 1. A child that dies before listening is a start-up failure (bad
  settings, a model spec that cannot parse): the parent stops the rest and exits with its code.
- Children leave the parent's process group, so a terminal's Ctrl-C reaches the parent only and
  the children stop in order; on Linux a child gets SIGTERM when the parent dies (PR_SET_PDEATHSIG).
- Metrics: PROMETHEUS_MULTIPROC_DIR is set to a fresh directory for the children, so any
  process's /metrics answers for the host (service/metrics.py); a dead child's files are merged
  into the totals of the dead and removed (metrics.retire), and the directory is removed at exit.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass

from service.config import Settings
from service.server import BACKLOG

log = logging.getLogger("service.workers")

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
STOP_MARGIN_S = 30.0
_PR_SET_PDEATHSIG = 1  # from linux/prctl.h


def _address(host: str, port: int) -> tuple[int, tuple]:
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return family, addr


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, never-listening SO_REUSEPORT socket that holds host:port (port 0: a free one) for the
    children. OSError when anything listens there already, another instance of this service included."""
    family, addr = _address(host, port)
    with socket.socket(family, socket.SOCK_STREAM) as probe:  # without SO_REUSEPORT: every listener conflicts
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(addr)
        addr = (addr[0], probe.getsockname()[1], *addr[2:])
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


def listening_socket(host: str, port: int) -> socket.socket:
    """One child's own listening socket on host:port, beside its siblings' (SO_REUSEPORT)."""
    family, addr = _address(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def _die_with_parent(parent: int) -> None:
    try:
        ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError, TypeError):  # not Linux: the child outlives a parent that is killed
        return
    if os.getppid() != parent:  # the parent died before the request took hold
        sys.exit(1)


def _child(settings: Settings, index: int, listening, parent: int) -> None:
    os.setpgrp()
    _die_with_parent(parent)
    from service.server import serve

    def listen() -> socket.socket:
        sock = listening_socket(settings.host, settings.port)
        listening.set()
        log.info("worker %d (pid %d) listening on %s:%d", index, os.getpid(), settings.host, settings.port)
        return sock

    sys.exit(serve(settings, listen))


@dataclass
class _Worker:
    index: int
    process: mp.process.BaseProcess
    listening: object  # a multiprocessing Event, set once the child listens


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.context = mp.get_context("spawn")
        self.workers: list[_Worker] = []
        self.stopping = False
        self.stopped_at = self.deadline = 0.0
        self.restarts: collections.deque[float] = collections.deque()

    def start(self, index: int) -> None:
        listening = self.context.Event()
        process = self.context.Process(target=_child, name=f"vit-worker-{index}",
                                       args=(self.settings, index, listening, os.getpid()))
        process.start()
        self.workers.append(_Worker(index, process, listening))
        log.info("worker %d started (pid %d)", index, process.pid)
        if self.stopping:  # a signal came while it started (one sent twice only stops it sooner)
            os.kill(process.pid, signal.SIGTERM)

    def signal_children(self, *_args) -> None:
        if not self.stopping:
            log.info("stopping: each worker drains (readiness 503), finishes accepted requests, then exits")
            self.stopping = True
            self.stopped_at = time.monotonic()
            # the children's own graceful shutdown is bounded by --request-timeout-s, then the models close
            self.deadline = self.stopped_at + self.settings.request_timeout_s + STOP_MARGIN_S
        for w in self.workers:
            if w.process.exitcode is None:
                os.kill(w.process.pid, signal.SIGTERM)

    def run(self) -> int:
        """Start the workers, keep them running until a signal, then wait for them; the exit code."""
        for i in range(self.settings.workers):
            if not self.stopping:
                self.start(i)
        failure: int | None = None
        while self.workers:
            multiprocessing.connection.wait([w.process.sentinel for w in self.workers], timeout=1.0)
            if self.stopping and time.monotonic() > self.deadline:
                for w in self.workers:
                    if w.process.exitcode is None:
                        log.error("worker %d (pid %d) still running %g s after the stop: killing it", w.index,
                                  w.process.pid, self.deadline - self.stopped_at)
                        w.process.kill()
                        w.process.join()
            for w in [w for w in self.workers if w.process.exitcode is not None]:
                self.workers.remove(w)
                code = w.process.exitcode
                _forget(w.process.pid)
                if self.stopping:
                    if code not in (0, -signal.SIGTERM):  # killed by SIGTERM before it served: nothing lost
                        log.error("worker %d (pid %d) exited with %s while stopping", w.index, w.process.pid, code)
                        failure = failure or 1
                    continue
                if not w.listening.is_set():
                    log.error("worker %d (pid %d) failed at start-up (exit code %s): stopping", w.index,
                              w.process.pid, code)
                    failure = code if code and code > 0 else 1
                    self.signal_children()
                    continue
                now = time.monotonic()
                self.restarts.append(now)
                while self.restarts and self.restarts[0] < now - RESTART_WINDOW_S:
                    self.restarts.popleft()
                if len(self.restarts) > MAX_RESTARTS:
                    log.error("worker %d (pid %d) exited with %s; more than %d restarts in %g s: stopping",
                              w.index, w.process.pid, code, MAX_RESTARTS, RESTART_WINDOW_S)
                    failure = 1
                    self.signal_children()
                    continue
                log.warning("worker %d (pid %d) exited with %s: starting it again", w.index, w.process.pid, code)
                self.start(w.index)
        return failure or 0


def _forget(pid: int) -> None:
    """A dead process's metric files: its live gauges (queue depth, model status) dropped, its counts
    kept in the directory's totals of the dead, its files removed (service/metrics.py retire)."""
    from service.metrics import retire

    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        try:
            retire(pid, directory)
        except OSError as e:  # a full disk must not stop the supervisor: the files stay, counted as before
            log.error("could not merge the metrics of worker pid %d: %s", pid, e)


def supervise(settings: Settings) -> int:
    """`python -m service serve --workers N` (N > 1): run until SIGTERM or SIGINT; the exit code."""
    from service.logs import configure_logging

    configure_logging(settings.log_level, settings.log_json)
    if not sys.platform.startswith("linux"):  # elsewhere SO_REUSEPORT does not spread connections
        print("error: --workers needs Linux (SO_REUSEPORT spreads connections over processes only there); "
              "run one process per port here", file=sys.stderr)
        return 2
    try:
        reserved = reserve_port(settings.host, settings.port)
    except OSError as e:
        print(f"error: cannot listen on {settings.host}:{settings.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    settings = settings.model_copy(update={"port": reserved.getsockname()[1]})
    metrics_dir = tempfile.mkdtemp(prefix="vit-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    supervisor = Supervisor(settings)
    previous = {s: signal.signal(s, supervisor.signal_children) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        log.info("%d workers on %s:%d (parent pid %d)", settings.workers, settings.host, settings.port, os.getpid())
        return supervisor.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for w in supervisor.workers:  # only after an error in the supervisor itself
            w.process.kill()
        reserved.close()
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(metrics_dir, ignore_errors=True)
