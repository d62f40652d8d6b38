"""Ray Serve next to the single process, on the same cores (not in make test; needs .[ray]):

    HF_HUB_OFFLINE=1 python -m bench.ray_bench [--duration 10] [--warmup 2] [--out ray_bench.json]

A random-weight DeiT-Tiny, /rollout as JSON, bench/client.py as the load generator (its own process):

- process:    python -m service serve, its default CPU layout (one single-threaded engine per core);
- serve x1:   one Serve replica holding all the CPUs and the same layout (two engines, one thread each);
- serve x2:   two Serve replicas of one CPU each (one engine, one thread each);

at 16 clients (throughput) and at 1 client (latency: serve x1 minus process = the proxy's cost).
A local Ray cluster with as many CPUs as this process may use, no dashboard.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm
import torch

from bench.served import BATCHING, bench_png, free_port, run_client, save_model, server
from service import runtime


def _wait_running(serve, replicas: int, timeout: float = 300) -> None:
    from service import ray_serve

    deadline = time.monotonic() + timeout
    while True:
        app = serve.status().applications.get(ray_serve.APP_NAME)
        states = dict(app.deployments[ray_serve.DEPLOYMENT].replica_states) if app and app.deployments else {}
        if states == {"RUNNING": replicas}:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"replicas did not settle: {states}")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ray_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = p.parse_args(argv)
    cores = runtime.usable_cores()
    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    torch.manual_seed(0)
    spec = save_model(timm.create_model("deit_tiny_patch16_224", pretrained=False).eval(), work / "model")
    image = work / "bench.png"
    image.write_bytes(bench_png())
    flags = BATCHING["default"]
    cells: list[dict] = []

    def cell(name: str, port: int, clients: int) -> None:
        fig = run_client(port, "rollout-json", image, clients, args.duration, args.warmup)
        fig.update(setup=name, clients=clients)
        cells.append(fig)
        print(f"{name:<10} {clients:>3} clients: {fig['req_s']:7.1f} req/s  p50 {fig['p50_ms']:7.1f} ms  "
              f"p95 {fig['p95_ms']:7.1f} ms  errors {fig.get('errors', 0)}", flush=True)

    with server(spec, flags, work / "process.log") as (port, _proc):
        cell("process", port, args.clients)
        cell("process", port, 1)

    import ray
    from ray import serve

    from service import ray_cli, ray_serve

    ray.init(address="local", num_cpus=cores, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, object_store_memory=100 * 1024 * 1024)
    try:
        port = free_port()
        base = ["--model", f"deit={spec}", "--host", "127.0.0.1", "--port", str(port), *flags]
        layouts = {
            "serve x1": ["--replicas", "1", "--replica-cpus", str(cores), "--replicas-per-device", str(min(cores, 4)),
                         "--threads", "1"],
            "serve x2": ["--replicas", "2", "--replica-cpus", str(cores / 2)],
        }
        for name, extra in layouts.items():
            overrides, shape, _ = ray_cli.parse(base + extra)
            ray_serve.deploy(overrides, shape)
            _wait_running(serve, shape["replicas"])
            cell(name, port, args.clients)
            if name == "serve x1":
                cell(name, port, 1)
            # delete before the next layout: an in-place update to replicas of another size waits
            # for the CPUs the old replicas hold
            serve.delete(ray_serve.APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()

    by = {(c["setup"], c["clients"]): c for c in cells}
    proxy_ms = by[("serve x1", 1)]["p50_ms"] - by[("process", 1)]["p50_ms"]
    summary = {"cores": cores, "torch": torch.__version__, "ray": ray.__version__, "cells": cells,
               "proxy_p50_ms_added": round(proxy_ms, 2)}
    print(f"Serve proxy at 1 client: +{proxy_ms:.1f} ms at p50")
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
