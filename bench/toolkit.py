"""Part C: what the toolkit's long and many-frame work costs, and what it costs the others.

  sweep  in process, batch 1: one rollout, one sweep over the default ratios, and one rollout
         per ratio (what a client without the sweep would send), the same for gradient rollout,
         the cases interleaved
  busy   served: `/rollout` JSON latency at one client with the server idle, then while
         `--sessions` activation maximizations stream their steps (each restarting when done),
         and how many maximization steps per second ran meanwhile
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import httpx
import torch

from bench import inprocess, served
from service.engine.engine import Engine
from service.methods import job
from service.methods.sweep import DEFAULT_RATIOS


def sweep_cost(timing: dict, log=print) -> dict:
    """{case: ms per image} for one map, one sweep and one request per ratio, rollout and gradient rollout."""
    torch.manual_seed(inprocess.SEED)
    engine = Engine(copy.deepcopy(inprocess.make_model()), torch.device("cpu"))
    cat = inprocess.CATEGORY_ID
    cases = {
        "rollout": lambda x: engine.run(x, [job("rollout")]),
        "rollout sweep": lambda x: engine.run(x, [job("rollout-sweep")]),
        "rollout per ratio": lambda x: [engine.run(x, [job("rollout", discard_ratio=r)]) for r in DEFAULT_RATIOS],
        "grad-rollout": lambda x: engine.run(x, [job("grad-rollout", category_id=cat)]),
        "grad-rollout sweep": lambda x: engine.run(x, [job("grad-rollout-sweep", category_id=cat)]),
        "grad-rollout per ratio": lambda x: [engine.run(x, [job("grad-rollout", category_id=cat, discard_ratio=r)])
                                             for r in DEFAULT_RATIOS],
    }
    figs = inprocess.time_cases(cases, inprocess.make_images(1), **timing)
    out = {name: fig["ms_per_batch"] for name, fig in figs.items()}
    for name, ms in out.items():
        log(f"  {name:<24} {ms:8.1f} ms  ({len(DEFAULT_RATIOS)} ratios)" if "sweep" in name or "per ratio" in name
            else f"  {name:<24} {ms:8.1f} ms")
    return {"ratios": len(DEFAULT_RATIOS), "ms": out}


def _maximize_forever(url: str, stop: threading.Event, steps: list[int], seed: int) -> None:
    """One client streaming activation maximizations back to back until `stop`; counts progress events."""
    with httpx.Client(base_url=url, timeout=120) as client:
        while not stop.is_set():
            body = {"target": "class", "category_id": seed, "steps": 1000, "seed": seed}
            try:
                headers = {"Accept": "text/event-stream"}
                with client.stream("POST", "/activation-max", json=body, headers=headers) as resp:
                    for line in resp.iter_lines():
                        if line.startswith("event: progress"):
                            steps[0] += 1
                        if stop.is_set():
                            break
            except httpx.HTTPError:  # the server stopping under it, or a request timeout: start again or end
                continue


def busy_latency(workdir: Path, sessions: int, duration: float, warmup: float, log=print) -> dict:
    spec = served.save_model(inprocess.make_model(), workdir / "model-c")
    image = workdir / "bench-c.png"
    image.write_bytes(served.bench_png())
    with served.server(spec, [], workdir / "server-c.log") as (port, _proc):
        idle = served.run_client(port, "rollout-json", image, 1, duration, warmup)
        stop, counts = threading.Event(), [[0] for _ in range(sessions)]
        url = f"http://127.0.0.1:{port}"
        threads = [threading.Thread(target=_maximize_forever, args=(url, stop, counts[i], i), daemon=True)
                   for i in range(sessions)]
        for t in threads:
            t.start()
        time.sleep(warmup)
        before, t0 = sum(c[0] for c in counts), time.monotonic()
        busy = served.run_client(port, "rollout-json", image, 1, duration, 0.0)
        steps_s = (sum(c[0] for c in counts) - before) / (time.monotonic() - t0)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    out = {"sessions": sessions, "idle": idle, "busy": busy, "ascent_steps_per_s": steps_s}
    log(f"  /rollout at 1 client, idle: p50 {idle['p50_ms']:.1f} ms, p95 {idle['p95_ms']:.1f} ms")
    log(f"  ... while {sessions} maximizations run: p50 {busy['p50_ms']:.1f} ms, p95 {busy['p95_ms']:.1f} ms; "
        f"{steps_s:.1f} ascent steps/s meanwhile")
    return out


def render(toolkit: dict) -> list[str]:
    sweep, busy = toolkit.get("sweep"), toolkit.get("busy")
    lines = []
    if sweep:
        ms = sweep["ms"]
        lines += ["", f"## The discard sweep ({sweep['ratios']} ratios), in process, batch 1 (ms per image)", "",
                  "| | one map | one sweep | one request per ratio |", "|---|---:|---:|---:|"]
        for m in ("rollout", "grad-rollout"):
            lines.append(f"| {m} | {ms[m]:.1f} | {ms[m + ' sweep']:.1f} | {ms[m + ' per ratio']:.1f} |")
    if busy:
        i, b = busy["idle"], busy["busy"]
        lines += ["", "## `/rollout` at one client while activation maximizations run (served)", "",
                  "| | p50 ms | p95 ms | req/s |", "|---|---:|---:|---:|",
                  f"| idle | {i['p50_ms']:.1f} | {i['p95_ms']:.1f} | {i['req_s']:.1f} |",
                  f"| {busy['sessions']} maximizations running | {b['p50_ms']:.1f} | {b['p95_ms']:.1f} "
                  f"| {b['req_s']:.1f} |",
                  "", f"ascent steps per second meanwhile: {busy['ascent_steps_per_s']:.1f}"]
    return lines
