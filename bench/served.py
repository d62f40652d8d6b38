"""Part B: the service over HTTP. A real `python -m service serve` process per batching setting,
loaded by a separate client process (client.py) per cell: endpoint x concurrent clients."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from timm.models import save_for_hf
from torch import nn

# name -> extra server flags; "default" is the service's own defaults, spelled out
BATCHING: dict[str, list[str]] = {
    "default": ["--max-batch-size", "16", "--max-delay-ms", "5"],
    "single": ["--max-batch-size", "1"],
}


def bench_png(seed: int = 0, size: int = 224) -> bytes:
    """A 224 x 224 PNG with structure at several scales (not pure noise), encoded once."""
    rng = np.random.default_rng(seed)
    layers = [
        np.asarray(Image.fromarray(rng.uniform(0, 255, (c, c, 3)).astype(np.uint8)).resize((size, size)), np.float32)
        for c in (4, 16, 64)
    ]
    img = Image.fromarray(np.clip(sum(layers) / len(layers), 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_model(model: nn.Module, folder: Path) -> str:
    """The model as a local-dir folder; returns the spec the server takes."""
    save_for_hf(model, str(folder), safe_serialization=True)
    return f"local-dir:{folder}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


@contextlib.contextmanager
def server(
    spec: str, flags: list[str], log_path: Path, timeout: float = 180.0, env: dict[str, str] | None = None,
    cwd: Path | None = None, alias: str = "deit",
) -> Iterator[tuple[int, subprocess.Popen]]:
    """Start `python -m service serve --model ALIAS=SPEC ...` with its defaults (log level included)
    but for `flags`, wait for /readyz == 200, stop it after. `env` adds to this process's environment;
    `cwd` (default: this one) is where it runs, and `python -m` imports `service` from there first."""
    args = [sys.executable, "-m", "service", "serve", "--model", f"{alias}={spec}", *flags]
    with running(args, log_path, timeout, env, cwd) as (port, proc):
        yield port, proc


@contextlib.contextmanager
def running(
    args: list[str], log_path: Path, timeout: float = 180.0, env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[tuple[int, subprocess.Popen]]:
    """Run `args --port P` (P free) until /readyz answers 200; terminate it after."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*args, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        try:
            deadline = time.monotonic() + timeout
            while not _ready(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not become ready; see {log_path}:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.3)
            yield port, proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident set) of a live process, in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def run_client(port: int, endpoint: str, image_path: Path, clients: int, duration: float, warmup: float) -> dict:
    """One cell, from a separate client process; returns its JSON figures."""
    args = [sys.executable, "-m", "bench.client", "--port", str(port), "--endpoint", endpoint,
            "--image", str(image_path), "--clients", str(clients), "--duration", str(duration), "--warmup", str(warmup)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=duration + warmup + 300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"client failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def _ms(v: float | None) -> str:
    return "      -" if v is None else f"{v:7.1f}"


def run_served_bench(
    model: nn.Module, workdir: Path, endpoints: list[str], batchings: list[str], clients: list[int],
    duration: float, warmup: float, log=print,
) -> dict:
    """{"cells": [...], "peak_rss_mb": {batching: MiB}}."""
    spec = save_model(model, workdir / "model")
    image_path = workdir / "bench.png"
    image_path.write_bytes(bench_png())
    cells, rss = [], {}
    for batching in batchings:
        with server(spec, BATCHING[batching], workdir / f"server-{batching}.log") as (port, proc):
            for endpoint in endpoints:
                for c in clients:
                    fig = run_client(port, endpoint, image_path, c, duration, warmup)
                    fig["batching"] = batching
                    cells.append(fig)
                    log(f"  served  {endpoint:<17} {batching:<7} {c:>3} clients: {fig['req_s']:7.1f} req/s"
                        f"  p50 {_ms(fig['p50_ms'])} ms  p95 {_ms(fig['p95_ms'])} ms"
                        f"  ({fig['requests']} ok, {fig['errors']} errors)")
            rss[batching] = peak_rss_mb(proc.pid)
    return {"cells": cells, "peak_rss_mb": rss, "image_bytes": image_path.stat().st_size}
