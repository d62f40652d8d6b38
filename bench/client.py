"""Load generator for part B, run as its own process so it shares neither process nor GIL
with the server:

    python -m bench.client --port P --endpoint rollout-json --image x.png \
        --clients 16 --duration 6 --warmup 1.5

C connections, each sending one request after another (HTTP/1.1 keep-alive) over plain asyncio
streams: the request bytes are built once, so the client spends as little CPU as possible on a
machine it shares with the server. Requests that complete inside the timed window (after the
warm-up) count, for the rate and for the latencies; no new request starts after the window.
Prints one JSON object: requests, errors, req_s, p50_ms, p95_ms, ...

`--request-file F` sends the bytes of F (a whole HTTP request, built by the caller: bench/path.py
uses it for bodies other than this module's multipart PNG) instead of `--endpoint`/`--image`, and
`--start-at T` places the timed window at T on `time.monotonic()`'s clock (shared by every
process on Linux), so that a caller can read the server's CPU time over the same window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time

# name -> (path, form fields other than the image)
ENDPOINTS: dict[str, tuple[str, dict[str, str]]] = {
    "rollout-json": ("/rollout", {"format": "json"}),
    "rollout-png": ("/rollout", {"format": "png"}),
    "grad-rollout-json": ("/grad-rollout", {"format": "json", "category_id": "281"}),
}

_BOUNDARY = "benchboundary7d1f0c3a"


def build_request(host: str, port: int, path: str, fields: dict[str, str], image: bytes) -> bytes:
    """One multipart/form-data POST, as bytes, reused for every request."""
    parts = []
    for k, v in fields.items():
        parts.append(f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    parts.append(
        f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="bench.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n"
    )
    parts.append(f"--{_BOUNDARY}--\r\n".encode())
    body = b"".join(parts)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={_BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """Send one request, read the whole answer, return its status code."""
    writer.write(request)
    await writer.drain()
    status = int((await reader.readline()).split(b" ", 2)[1])
    length = None
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length is None:
        raise RuntimeError("answer without Content-Length")
    await reader.readexactly(length)
    return status


async def _connection(host: str, port: int, request: bytes, window: tuple[float, float], stats: dict) -> None:
    t_start, t_end = window
    reader = writer = None
    while time.monotonic() < t_end:
        if writer is None:
            reader, writer = await asyncio.open_connection(host, port)
        t0 = time.monotonic()
        try:
            status = await _exchange(reader, writer, request)
        except (ConnectionError, asyncio.IncompleteReadError, RuntimeError, ValueError, IndexError):
            status = -1
            writer.close()
            reader = writer = None
        t1 = time.monotonic()
        if t_start <= t1 <= t_end:
            if status == 200:
                stats["latencies"].append(t1 - t0)
            else:
                stats["errors"] += 1
    if writer is not None:
        writer.close()


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


async def load(host: str, port: int, request: bytes, clients: int, duration: float, warmup: float,
               start_at: float | None = None) -> dict:
    start = time.monotonic() + warmup if start_at is None else start_at
    window = (start, start + duration)
    stats: dict = {"latencies": [], "errors": 0}
    await asyncio.gather(*(_connection(host, port, request, window, stats) for _ in range(clients)))
    lat = sorted(stats["latencies"])
    return {
        "clients": clients,
        "seconds": duration,
        "requests": len(lat),
        "errors": stats["errors"],
        "req_s": len(lat) / duration,
        "p50_ms": percentile(lat, 50) * 1e3 if lat else None,
        "p95_ms": percentile(lat, 95) * 1e3 if lat else None,
        "mean_ms": sum(lat) / len(lat) * 1e3 if lat else None,
        "max_ms": lat[-1] * 1e3 if lat else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.client")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--endpoint", choices=sorted(ENDPOINTS))
    p.add_argument("--image", help="a PNG file, uploaded as is")
    p.add_argument("--request-file", help="a whole HTTP request to send instead of --endpoint and --image")
    p.add_argument("--start-at", type=float,
                   help="the timed window's start on time.monotonic() (default: after --warmup)")
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--duration", type=float, default=6.0, help="timed seconds")
    p.add_argument("--warmup", type=float, default=1.5, help="untimed seconds first")
    a = p.parse_args(argv)
    if a.request_file:
        with open(a.request_file, "rb") as f:
            request = f.read()
    elif a.endpoint and a.image:
        path, fields = ENDPOINTS[a.endpoint]
        with open(a.image, "rb") as f:
            request = build_request(a.host, a.port, path, fields, f.read())
    else:
        p.error("give --endpoint and --image, or --request-file")
    out = asyncio.run(load(a.host, a.port, request, a.clients, a.duration, a.warmup, a.start_at))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["client_cpu_s"] = ru.ru_utime + ru.ru_stime
    out["endpoint"] = a.endpoint or a.request_file
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
