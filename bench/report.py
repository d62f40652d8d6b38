"""The targets, the printed table, docs/bench/results.json, results.md and MACHINE.md."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch

from service import runtime

TARGET_BATCH = 16  # the engine targets and the served comparisons are at batch 16 / 16 clients
TARGET_CLIENTS = 16


# -- machine ----------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def competing_processes(needles: tuple[str, ...] = ("demo.train",)) -> list[str]:
    """Command lines of known CPU-heavy processes (a training run) that would skew the timings."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if any(n in cmd for n in needles):
            found.append(f"{d.name}: {cmd}")
    return found


def cpu_busy_pct(seconds: float = 1.0) -> float:
    """How busy all CPUs were (percent) over a short idle wait of ours: what others are using."""
    def sample() -> tuple[int, int]:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except OSError:
        return float("nan")
    return 100.0 * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def machine_info() -> dict:
    server_replicas, server_threads = runtime.cpu_layout(runtime.usable_cores(), None, None)  # the server's defaults
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "timm": timm.__version__,
        "python": platform.python_version(),
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_start": os.getloadavg(),
        "cpu_busy_pct_before": cpu_busy_pct(),
        "server_replicas": server_replicas,
        "server_threads": server_threads,
    }


# -- figures -> ratios and targets --------------------------------------------------------------
def engine_ratios(engine: dict) -> dict[int, dict[str, float]]:
    """Per batch size: rollout/bare, grad/floor, grad/(fwd+full bwd), rollout speed-up over naive."""
    out = {}
    for b in engine["bare"]:
        img = {c: engine[c][b]["img_s"] for c in engine}
        out[b] = {
            "rollout_over_bare": img["rollout"] / img["bare"],
            "grad_over_floor": img["grad_rollout"] / img["grad_floor"],
            "grad_over_fwd_full_bwd": img["grad_rollout"] / img["fwd_full_bwd"],
            "rollout_speedup_over_naive": img["rollout"] / img["naive"],  # = naive time / rollout time
        }
    return out


def _cell(served: dict | None, endpoint: str, batching: str, clients: int) -> dict | None:
    for c in (served or {}).get("cells", []):
        if c["endpoint"] == endpoint and c["batching"] == batching and c["clients"] == clients:
            return c
    return None


def _img_s(engine: dict, case: str, batch: int) -> float | None:
    fig = engine.get(case, {}).get(batch)
    return fig["img_s"] if fig else None


def targets(engine: dict, served: dict | None, plain: dict | None = None) -> list[dict]:
    """Each target: name, value, threshold, unit, and pass (None where its figures were not run).

    Ratios use this process's figures (same allocator settings as the server); `plain` holds bare and
    grad_floor timed in a fresh process with default settings, which is how the issue's own check
    measures them, for its floors (0.70x, 0.75x)."""
    rows: list[dict] = []

    def ratio(name: str, num: float | None, den: float | None, threshold: float) -> None:
        value = num / den if num is not None and den else None
        rows.append({"name": name, "value": value, "threshold": threshold, "kind": ">=", "unit": "x",
                     "pass": None if value is None else value >= threshold})

    b, c = TARGET_BATCH, TARGET_CLIENTS
    ratio(f"engine rollout / bare forward (batch {b})", _img_s(engine, "rollout", b), _img_s(engine, "bare", b), 0.95)
    ratio(f"engine grad rollout / grad floor (batch {b})", _img_s(engine, "grad_rollout", b),
          _img_s(engine, "grad_floor", b), 0.9)
    ratio(f"engine grad rollout / fwd+full bwd (batch {b})", _img_s(engine, "grad_rollout", b),
          _img_s(engine, "fwd_full_bwd", b), 1.2)

    def req_s(endpoint: str, batching: str, clients: int) -> float | None:
        cell = _cell(served, endpoint, batching, clients)
        return cell["req_s"] if cell else None

    ratio(f"served /rollout json, {c} clients / bare forward (batch {b})", req_s("rollout-json", "default", c),
          _img_s(engine, "bare", b), 0.8)
    ratio(f"served /rollout png, {c} clients / bare forward (batch {b})", req_s("rollout-png", "default", c),
          _img_s(engine, "bare", b), 0.7)
    ratio(f"served /grad-rollout json, {c} clients / grad floor (batch {b})", req_s("grad-rollout-json", "default", c),
          _img_s(engine, "grad_floor", b), 0.8)
    plain_img_s = {case: fig["img_s"] for case, fig in (plain or {}).items()}
    ratio(f"issue's check: served /rollout json, {c} clients / bare forward in a plain process (batch {b})",
          req_s("rollout-json", "default", c), plain_img_s.get("bare"), 0.70)
    ratio(f"issue's check: served /grad-rollout json, {c} clients / grad floor in a plain process (batch {b})",
          req_s("grad-rollout-json", "default", c), plain_img_s.get("grad_floor"), 0.75)
    for ep in ("rollout-json", "rollout-png", "grad-rollout-json"):
        ratio(f"batching / --max-batch-size 1, {ep}, {c} clients", req_s(ep, "default", c), req_s(ep, "single", c), 1.2)

    # latency: p50 at 1 client minus the time of one batch-1 forward of its reference
    for ep, case in (("rollout-json", "bare"), ("rollout-png", "bare"), ("grad-rollout-json", "grad_floor")):
        cell = _cell(served, ep, "default", 1)
        ref = engine.get(case, {}).get(1)
        value = cell["p50_ms"] - ref["ms_per_batch"] if cell and ref else None
        rows.append({"name": f"p50 {ep}, 1 client - {case} batch-1 time", "value": value, "threshold": 10.0,
                     "kind": "<=", "unit": "ms", "pass": None if value is None else value <= 10.0})
    return rows


# -- text ---------------------------------------------------------------------------------------
def _fmt(v: float | None, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


# The renderers of the parts after A (bench/faithfulness.py, toolkit.py, path.py, capture.py), by their key in the
# results; each caller passes them (bench/__main__.py, path.merge_into_report), so the report imports none of its parts.
Renderers = dict[str, Callable[[dict], list[str]]]


def render(results: dict, parts: Renderers) -> str:
    engine, ratios, served = results["engine"], results["ratios"], results.get("served")
    batches = list(engine["bare"])
    lines = ["## Engine, in process (images/s, median; deit_tiny_patch16_224, random weights, CPU)", ""]
    lines.append("| case | " + " | ".join(f"batch {b}" for b in batches) + " |")
    lines.append("|---|" + "---:|" * len(batches))
    for case, figs in engine.items():
        lines.append(f"| {case} | " + " | ".join(_fmt(figs[b]["img_s"], 1) for b in batches) + " |")
    lines += ["", "| ratio | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|" + "---:|" * len(batches)]
    for key in next(iter(ratios.values())):
        lines.append(f"| {key} | " + " | ".join(_fmt(ratios[b][key]) for b in batches) + " |")
    lines.append("")
    lines.append(f"naive vs engine rollout maps, max |diff|: {results['naive_max_abs_diff']:.2e}")
    for case, fig in (results.get("plain_process") or {}).items():
        lines.append(f"{case} at batch {TARGET_BATCH} in a fresh process with default allocator settings: "
                     f"{fig['img_s']:.1f} img/s")
    if served:
        lines += ["", "## Served over HTTP (separate client process; req/s, latency ms)", "",
                  "| endpoint | batching | clients | req/s | p50 | p95 | ok | errors |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for c in served["cells"]:
            lines.append(f"| {c['endpoint']} | {c['batching']} | {c['clients']} | {_fmt(c['req_s'], 1)} | "
                         f"{_fmt(c['p50_ms'], 1)} | {_fmt(c['p95_ms'], 1)} | {c['requests']} | {c['errors']} |")
        rss = ", ".join(f"{k}: {_fmt(v, 0)} MiB" for k, v in served["peak_rss_mb"].items())
        lines += ["", f"server peak RSS (VmHWM): {rss}"]
    for key in ("faithfulness", "actmax", "toolkit", "path", "capture"):
        if results.get(key) and key in parts:
            lines += parts[key](results[key])
    lines += ["", "## Targets", ""]
    for t in results["targets"]:
        verdict = "n/a " if t["pass"] is None else ("PASS" if t["pass"] else "MISS")
        by = ""
        if t["pass"] is False and t["value"]:
            by = f", missed by {t['value'] / t['threshold'] if t['kind'] == '<=' else t['threshold'] / t['value']:.2f}x"
        note = f"; {t['note']}" if t.get("note") else ""
        lines.append(f"- {verdict}  {t['name']}: {_fmt(t['value'])} {t['unit']} "
                     f"(target {t['kind']} {t['threshold']}{by}{note})")
    return "\n".join(lines) + "\n"


def _load(avg) -> str:
    return ", ".join(f"{v:.2f}" for v in avg)


def machine_note(results: dict) -> str:
    m = results["machine"]
    s = results["settings"]
    busy = m.get("competing_processes") or []
    return "\n".join([
        "# Benchmark machine",
        "",
        f"- date (UTC): {m['date_utc']}",
        f"- CPU: {m['cpu_model']}, {m['cpu_count']} logical cores ({m['cpus_usable']} usable), no GPU used",
        f"- torch {m['torch']}, {m['torch_threads']} intra-op threads for every in-process case (torch's default), "
        f"{m['torch_interop_threads']} inter-op; timm {m['timm']}; Python {m['python']}",
        f"- the server runs its CPU defaults: {m.get('server_replicas')} replica(s) x {m.get('server_threads')} "
        "thread(s) (service/runtime.py)",
        f"- allocator tuned for part A as the server tunes it (service/runtime.py): {m.get('allocator_tuned')}",
        f"- load average at start / end: {_load(m['loadavg_start'])} / {_load(m['loadavg_end'])}; CPUs busy "
        f"(others) just before the run: {m['cpu_busy_pct_before']:.0f}%",
        f"- other CPU-heavy processes seen: {', '.join(busy) if busy else 'none'}",
        f"- run: `{s['command']}` ({'quick' if s['quick'] else 'full'}), {s['elapsed_s']:.0f} s",
        *([f"- part D run on its own after that: `{r['command']}` at {r['date_utc']} UTC, {r['elapsed_s']:.0f} s, "
           f"on {r.get('cpu_model', '?')} ({r.get('cpu_count', '?')} logical cores), load average at its end "
           f"{_load(r['loadavg_end'])}"] if (r := s.get("path_run")) else []),
        "",
        "The client process shares these cores with the server, so served figures include its cost.",
        "Figures: results.json (all numbers), results.md (the printed table).",
        "",
    ])


def write(results: dict, out_dir: Path, parts: Renderers) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out_dir / "results.md").write_text(render(results, parts))
    (out_dir / "MACHINE.md").write_text(machine_note(results))
