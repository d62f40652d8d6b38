"""`python -m service serve --workers N` (service/workers.py), against real process trees: every
process answers on the one port with its own pid, limits hold per process, /metrics answers for
the host, a killed worker is replaced, SIGTERM drains every worker and the parent exits 0."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from pydantic import ValidationError

from service import runtime
from service.config import Settings
from tests.conftest import png_bytes, smooth_image
from tests.server import free_port, running_server

MAX_CONNECTIONS = 3  # per process


def children(pid: int) -> set[int]:
    """The worker processes of the parent `pid` (multiprocessing's resource tracker left out)."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if ppid == pid and b"spawn_main" in cmd:
                out.add(int(entry))
    return out


# One client whose every request asks for its connection to be closed: each request is a fresh connection (the
# kernel picks the process per connection) without a client built per request (21 ms of CPU each, its TLS context).
_fresh = httpx.Client(timeout=30, headers={"Connection": "close"})


def answering(url: str, path: str = "/healthz", want: int = 2, tries: int = 400) -> dict[int, httpx.Response]:
    """One answer per process, each on a fresh connection (the kernel picks the process per
    connection): stops when `want` pids answered, or after `tries` connections."""
    seen: dict[int, httpx.Response] = {}
    for _ in range(tries):
        try:
            r = _fresh.get(url + path)
        except httpx.TransportError:
            continue
        seen[r.json()["pid"]] = r
        if len(seen) >= want:
            break
    return seen


def kill_and_wait_replaced(server, victim: int, workers: int = 2) -> set[int]:
    """SIGKILL one worker and wait (up to 180 s) until the supervisor has a new one in its place.
    -> the workers' pids then."""
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 180
    while True:
        kids = children(server.proc.pid)
        if len(kids) == workers and victim not in kids:
            return kids
        assert time.monotonic() < deadline and server.proc.poll() is None
        time.sleep(0.3)


def wait_all_ready(url: str, workers: int, timeout: float = 180) -> dict[int, httpx.Response]:
    deadline = time.monotonic() + timeout
    while True:
        seen = answering(url, "/readyz", want=workers, tries=100)
        if len(seen) == workers and all(r.status_code == 200 for r in seen.values()):
            return seen
        assert time.monotonic() < deadline, f"not every worker became ready: {[r.json() for r in seen.values()]}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def server(tiny_dir):
    args = ["--model", f"tiny=local-dir:{tiny_dir}", "--workers", "2", "--max-connections", str(MAX_CONNECTIONS),
            "--read-timeout-s", "60", "--max-delay-ms", "1"]
    with running_server(args) as s:
        wait_all_ready(s.url, 2)
        yield s


# -- without a server -------------------------------------------------------------------------------
def test_workers_setting_is_bounded():
    assert Settings(workers=4).workers == 4 and Settings().workers == 1
    for bad in (0, -1, 65):
        with pytest.raises(ValidationError):
            Settings(workers=bad)
    from service.cli.serve import main

    assert main(["--workers", "0"]) == 2


def test_cores_are_shared_between_workers():
    assert runtime.worker_cores(2, 1) == 2 and runtime.worker_cores(2, 2) == 1 and runtime.worker_cores(16, 4) == 4
    assert runtime.worker_cores(2, 4) == 1 and runtime.worker_cores(3, 2) == 1  # an even share, at least one
    # on the 2-core box: one process, two single-threaded replicas; two processes, one each
    assert runtime.cpu_layout(runtime.worker_cores(2, 1), None, None) == (2, 1)
    assert runtime.cpu_layout(runtime.worker_cores(2, 2), None, None) == (1, 1)


@pytest.mark.slow
def test_port_in_use_is_refused_before_any_worker_starts(tiny_dir):
    # SO_REUSEPORT, as another instance of the service would hold it: the workers could bind beside it
    # and share its connections without a word, so the port must be found taken before they start
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "service", "serve", "--model", f"tiny=local-dir:{tiny_dir}",
                            "--workers", "2", "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in r.stderr
    assert "worker 0 started" not in r.stderr


@pytest.mark.slow
def test_a_worker_that_fails_at_start_up_stops_the_parent_with_its_code(tiny_dir):
    r = subprocess.run([sys.executable, "-m", "service", "serve", "--model", f"tiny=local-dir:{tiny_dir}",
                        "--workers", "2", "--port", str(free_port()), "--device", "cuda:63"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr
    assert "device cuda:63 requested but not available" in r.stderr and "failed at start-up" in r.stderr


# -- one server, two workers ------------------------------------------------------------------------
def test_every_worker_answers_with_its_own_pool(server):
    kids = children(server.proc.pid)
    seen = answering(server.url)
    assert len(kids) == 2 and set(seen) == kids, f"workers {kids}, answered by {set(seen)}"
    # each process plans for its share of the cores
    replicas, _ = runtime.cpu_layout(runtime.worker_cores(runtime.usable_cores(), 2), None, None)
    for _ in range(2 * len(kids)):
        assert _fresh.get(server.url + "/models").json()[0]["replicas"] == replicas
    r = httpx.post(server.url + "/predict", files={"image": ("x.png", png_bytes(smooth_image(1)), "image/png")})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 5


def _metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and ",".join(sorted(m.group(1).split(","))) == want:
            total += float(m.group(2))
    return total


def test_metrics_answer_for_every_worker(server):
    before = _fresh.get(server.url + "/metrics").text
    pids = []
    for _ in range(30):
        pids.append(_fresh.get(server.url + "/healthz").json()["pid"])  # a fresh connection each
    assert len(set(pids)) == 2, "30 connections all went to one worker"
    for _ in range(4):  # whichever worker answers the scrape, it counts the other's requests too
        after = _fresh.get(server.url + "/metrics").text
        grew = (_metric(after, "vit_requests_total", endpoint="/healthz", status="200")
                - _metric(before, "vit_requests_total", endpoint="/healthz", status="200"))
        assert grew == 30
    for pid in set(pids):  # each live process's model status, with its pid
        assert _metric(after, "vit_model_status", model="tiny", pid=pid, status="ready") == 1


def _hold_a_request(host: str, port: int) -> tuple[int | None, socket.socket]:
    """A fresh connection, told apart by the worker that answers its GET /healthz (None: refused with
    503), then given a request under way: POST headers sent, the server's `100 Continue` read back
    (its app is reading the body, so the connection is busy, not idle), part of the body sent."""
    sock = socket.create_connection((host, port), timeout=10)
    try:
        if not select.select([sock], [], [], 0.2)[0]:  # a refusal comes at once, unasked
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_answer(sock)
    except (ConnectionResetError, BrokenPipeError):  # refused while our GET was unread: the close resets
        return None, sock
    if answer.startswith(b"HTTP/1.1 503"):
        assert b"retry-after:" in answer.lower(), answer
        return None, sock
    assert answer.startswith(b"HTTP/1.1 200"), answer
    pid = int(re.search(rb'"pid":(\d+)', answer).group(1))
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 b"Expect: 100-continue\r\nContent-Length: 1000\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = sock.recv(4096)
        assert chunk, f"closed before 100 Continue: {got!r}"
        got += chunk
    assert got.startswith(b"HTTP/1.1 100"), got
    sock.sendall(b"x" * 10)
    return pid, sock


def test_connection_limit_holds_per_worker(server):
    # Busy connections cannot be evicted: past --max-connections a worker refuses the next with 503.
    # Each connection is told apart by the pid that answers it, so the count is per worker and does
    # not depend on how the kernel's hash spreads them.
    host, port = server.url.removeprefix("http://").split(":")
    held: dict[int, list[socket.socket]] = {}
    refused, socks = 0, []
    try:
        for _ in range(200):
            pid, sock = _hold_a_request(host, int(port))
            socks.append(sock)
            if pid is None:
                refused += 1
            else:
                held.setdefault(pid, []).append(sock)
                assert len(held[pid]) <= MAX_CONNECTIONS, f"worker {pid} took a busy connection past its limit"
            if len(held) == 2 and all(len(v) == MAX_CONNECTIONS for v in held.values()) and refused >= 4:
                break
        assert sorted(len(v) for v in held.values()) == [MAX_CONNECTIONS] * 2, held
        assert refused >= 4
        time.sleep(0.5)  # the held requests are still under way: none was closed to make room
        assert not any(select.select([s], [], [], 0)[0] for v in held.values() for s in v)
    finally:
        for s in socks:
            s.close()


def test_a_killed_worker_is_replaced(server):
    old = children(server.proc.pid)
    victim = min(old)
    kids = kill_and_wait_replaced(server, victim)
    seen = wait_all_ready(server.url, 2)
    assert set(seen) == kids and victim not in seen
    assert server.proc.poll() is None


def _metrics_dir(pid: int) -> str:
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    return env[b"PROMETHEUS_MULTIPROC_DIR"].decode()


def test_killed_workers_leave_their_counts_not_their_files(server):
    """Three workers killed one after another, each after it answered requests: the metrics
    directory holds files of the live workers and of the dead (merged) only, and /metrics still
    counts every request the dead ones answered."""
    directory = _metrics_dir(min(children(server.proc.pid)))

    def healthz_total() -> float:
        text = _fresh.get(server.url + "/metrics").text
        return _metric(text, "vit_requests_total", endpoint="/healthz", status="200")

    start, sent = healthz_total(), 0
    for _ in range(3):
        served: dict[int, int] = {}
        while len(served) < 2 or sent < 10:  # fresh connections until both workers answered some
            pid = _fresh.get(server.url + "/healthz").json()["pid"]
            served[pid] = served.get(pid, 0) + 1
            sent += 1
            assert sent < 2000, "every connection went to one worker"
        deadline = time.monotonic() + 30
        while healthz_total() < start + sent:  # a request is counted just after its answer: all counted, then kill
            assert time.monotonic() < deadline, "the answered requests were never all counted"
            time.sleep(0.05)
        victim = min(served)
        kids = kill_and_wait_replaced(server, victim)
        wait_all_ready(server.url, 2)
        owners = {name.rsplit("_", 1)[1].removesuffix(".db") for name in os.listdir(directory) if name.endswith(".db")}
        assert owners <= {str(k) for k in kids} | {"dead"}, (owners, kids)
        assert len(os.listdir(directory)) <= 4 * 2 + 2 + 1  # four per live worker, two of the dead, the lock
        assert healthz_total() == start + sent  # whichever worker answers the scrape
    assert server.proc.poll() is None


def read_answer(sock: socket.socket) -> bytes:
    """One whole HTTP answer with a Content-Length body."""
    answer = b""
    while True:
        head, sep, rest = answer.partition(b"\r\n\r\n")
        if sep:
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
            if len(rest) >= length:
                return answer
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before the whole answer: {answer!r}"
        answer += chunk


@pytest.mark.slow
def test_sigterm_drains_every_worker_then_exits_0(tiny_dir):
    args = ["--model", f"tiny=local-dir:{tiny_dir}", "--workers", "2", "--read-timeout-s", "60"]
    with running_server(args) as s:
        wait_all_ready(s.url, 2)
        kids = children(s.proc.pid)
        host, port = s.url.removeprefix("http://").split(":")
        body = png_bytes(smooth_image(2))
        head = (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
                b"Content-Type: image/png\r\n\r\n")
        multipart = head + body + b"\r\n--b--\r\n"
        held: dict[int, list[socket.socket]] = {pid: [] for pid in kids}
        for _ in range(100):  # a request under way in each worker, two where the hash allows
            sock = socket.create_connection((host, int(port)), timeout=60)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = read_answer(sock)
            pid = int(re.search(rb'"pid":(\d+)', answer).group(1))
            if len(held[pid]) >= 2:
                sock.close()
                continue
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(multipart) + multipart[:100])
            held[pid].append(sock)
            if all(len(v) == 2 for v in held.values()):
                break
        assert all(held.values()), "the connections never reached one of the workers"
        time.sleep(1)  # the last request's headers have been read: it is under way, not an idle connection
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while True:  # the workers stop listening: new connections are refused
            try:
                socket.create_connection((host, int(port)), timeout=5).close()
            except ConnectionRefusedError:
                break
            assert time.monotonic() < deadline, "still accepting connections 60 s after SIGTERM"
            time.sleep(0.1)
        for socks in held.values():  # ... while the requests they had accepted finish
            for sock in socks:
                sock.sendall(multipart[100:])
                answer = read_answer(sock)
                assert answer.startswith(b"HTTP/1.1 200") and b'"predictions"' in answer
                sock.close()
        assert s.proc.wait(timeout=90) == 0
        assert not any(os.path.exists(f"/proc/{pid}") for pid in kids)
