"""Start a real `python -m service serve` process for a test module and wait until it is ready: forked
by the zygote of this test process (tests/zygote.py: the imports made once), or, with
VIT_TEST_FRESH_SERVERS=1, a fresh interpreter."""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx


class Forked:
    """What the tests use of a `subprocess.Popen`, for a server the zygote forked: its pid, signals, and its
    exit status (as Popen's returncode: -N for signal N), which the zygote sends when it ends."""

    def __init__(self, conn: socket.socket, args: list[str]) -> None:
        self.args = args
        self.returncode: int | None = None
        self._conn = conn
        self.pid = int(self._line())

    def _line(self) -> str:
        data = b""
        while not data.endswith(b"\n"):
            chunk = self._conn.recv(1)  # byte by byte: nothing read past the line, so select() sees the next
            if not chunk:
                raise RuntimeError("the zygote closed the connection (it has gone)")
            data += chunk
        return data.decode()

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._conn], [], [], 0)[0]:
            self._ended()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self._conn], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._ended()
        return self.returncode

    def _ended(self) -> None:
        self.returncode = int(self._line())
        self._conn.close()

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


_zygote: tuple[subprocess.Popen, str] | None = None
_zygote_lock = threading.Lock()


def _zygote_path() -> str:
    """The socket of this test process's zygote, started on first use and ended with the process."""
    global _zygote
    with _zygote_lock:
        if _zygote is None or _zygote[0].poll() is not None:
            folder = tempfile.mkdtemp(prefix="vit-zygote-")
            path = os.path.join(folder, "sock")
            with open(os.path.join(folder, "log"), "wb") as log:  # not pytest's capture of the test that started it
                proc = subprocess.Popen([sys.executable, "-m", "tests.zygote", path], stdin=subprocess.PIPE,
                                        stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1],
                                        env={**os.environ, "HF_HUB_OFFLINE": "1"})
            atexit.register(_end_zygote, proc, folder)
            deadline = time.monotonic() + 120
            while not os.path.exists(path):  # it appears once the zygote listens (tests/zygote.py)
                if proc.poll() is not None or time.monotonic() > deadline:
                    with open(os.path.join(folder, "log")) as f:
                        raise RuntimeError(f"the test servers' zygote did not start (exit {proc.poll()}):\n{f.read()}")
                time.sleep(0.05)
            _zygote = (proc, path)
        return _zygote[1]


def _end_zygote(proc: subprocess.Popen, folder: str) -> None:
    proc.stdin.close()  # its stdin closes: it exits
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    shutil.rmtree(folder, ignore_errors=True)


def _start(argv: list[str], log_fd: int, log_path: str, env: dict) -> subprocess.Popen | Forked:
    """`python -m service ARGV`, forked by the zygote or (VIT_TEST_FRESH_SERVERS=1) a fresh interpreter."""
    cmd = [sys.executable, "-m", "service", *argv]
    if os.environ.get("VIT_TEST_FRESH_SERVERS") == "1":
        return subprocess.Popen(cmd, stdout=log_fd, stderr=subprocess.STDOUT, env=env)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(_zygote_path())
    conn.sendall(json.dumps({"argv": argv, "env": env, "cwd": os.getcwd(), "log": log_path}).encode() + b"\n")
    return Forked(conn, cmd)


@dataclass
class Server:
    url: str
    proc: subprocess.Popen | Forked
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
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = _start(["serve", "--port", str(port), *args], fd, log_path, env)
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
