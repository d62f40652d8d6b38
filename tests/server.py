"""Start a real `python -m service serve` process for a test module and wait until it is ready."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: str

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")


# Ports handed to servers: below the kernel's ephemeral range (32768-60999 by default), where bind(0) and
# every outgoing connection take theirs, so that nothing takes a port between free_port() and the server's
# bind; each pytest-xdist worker (PYTEST_XDIST_WORKER=gw0, gw1, ...) draws from its own slice of 500.
_PORT_BASE, _PORT_SLICE = 20000, 500
_next_port = itertools.count(random.randrange(_PORT_SLICE))


def free_port() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    first = _PORT_BASE + _PORT_SLICE * (int(worker.removeprefix("gw") or 0) % 24)
    for _ in range(_PORT_SLICE):
        port = first + next(_next_port) % _PORT_SLICE
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken (another program, or a port still in TIME_WAIT)
            return port
    with socket.socket() as s:  # the whole slice taken: any port the kernel gives
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(args: list[str], ready_timeout: float = 180, env: dict | None = None) -> Iterator[Server]:
    port = free_port()
    fd, log_path = tempfile.mkstemp(prefix="vit-server-", suffix=".log")
    cmd = [sys.executable, "-m", "service", "serve", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=fd, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    os.close(fd)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + ready_timeout
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not become ready:\n{server.log()}")
                time.sleep(0.3)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        os.unlink(log_path)
