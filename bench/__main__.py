"""`python -m bench [--quick]`: run parts A (engine), B (served), C (toolkit), D (request path), E
(faithfulness), F (the capture per family) and G (activation maximization's step), print, write
docs/bench/."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: random weights only

from bench import actmax_cost, capture, faithfulness, inprocess, path, report, served, toolkit
from bench.client import ENDPOINTS
from service import runtime

FULL = {"batches": "1,8,16,32", "clients": "1,4,16,64", "duration": 10.0, "warmup": 2.0, "faithfulness_steps": 16,
        "timing": inprocess.TIMING, "actmax_copies": (1, 2, 4, 8)}
QUICK = {"batches": "1,16", "clients": "1,16", "duration": 1.5, "warmup": 0.5, "faithfulness_steps": 2,
         "timing": inprocess.TIMING_QUICK, "actmax_copies": (1, 4)}


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="a much shorter run for development")
    p.add_argument("--batches", help="engine batch sizes, e.g. 1,8,16,32")
    p.add_argument("--clients", help="concurrent clients per served cell, e.g. 1,4,16,64")
    p.add_argument("--endpoints", default=",".join(ENDPOINTS), help=f"subset of {','.join(ENDPOINTS)}")
    p.add_argument("--batching", default=",".join(served.BATCHING), help=f"subset of {','.join(served.BATCHING)}")
    p.add_argument("--duration", type=float, help="timed seconds per served cell")
    p.add_argument("--warmup", type=float, help="untimed seconds before each served cell")
    p.add_argument("--skip-served", action="store_true", help="no served parts (B and C's busy latency)")
    p.add_argument("--skip-toolkit", action="store_true", help="no part C (sweep cost, latency during maximizations)")
    p.add_argument("--sessions", type=int, default=2, help="activation maximizations running in part C")
    p.add_argument("--skip-path", action="store_true", help="no part D (server CPU per request on a near-zero model)")
    p.add_argument("--path-body", default="auto", choices=("auto", *path.BODIES),
                   help="part D's request body (default auto: raw image/jpeg when the server takes it, else multipart)")
    p.add_argument("--path-cases", default=",".join(path.ALL_KEYS), help=f"subset of {','.join(path.ALL_KEYS)}")
    p.add_argument("--skip-faithfulness", action="store_true", help="no part E (the faithfulness option's cost)")
    p.add_argument("--skip-capture", action="store_true", help="no part F (engine rollout / bare forward per family)")
    p.add_argument("--capture-families", default=",".join(capture.FAMILIES),
                   help=f"part F's families, from {','.join(capture.FAMILIES)}")
    p.add_argument("--skip-actmax", action="store_true", help="no part G (activation maximization's step cost)")
    p.add_argument("--no-tune-allocator", action="store_true",
                   help="time part A with glibc's default allocator (the server tunes it unless told not to)")
    p.add_argument("--out", default="docs/bench", help="folder for results.json, results.md, MACHINE.md")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if set(args.path_cases.split(",")) - set(path.ALL_KEYS):
        parser.error(f"--path-cases: from {','.join(path.ALL_KEYS)}")
    preset = QUICK if args.quick else FULL
    batches = _ints(args.batches or preset["batches"])
    clients = _ints(args.clients or preset["clients"])
    duration = args.duration if args.duration is not None else preset["duration"]
    warmup = args.warmup if args.warmup is not None else preset["warmup"]
    t0 = time.monotonic()

    machine = report.machine_info()
    machine["competing_processes"] = report.competing_processes()
    if machine["competing_processes"]:
        print("WARNING: CPU-heavy processes are running; timings will be skewed:", *machine["competing_processes"],
              sep="\n  ")
    print(f"{machine['cpu_model']}, {machine['cpus_usable']} cores, torch {machine['torch']} "
          f"({machine['torch_threads']} threads); CPUs busy before start: {machine['cpu_busy_pct_before']:.0f}%")

    machine["allocator_tuned"] = False if args.no_tune_allocator else runtime.tune_allocator()
    print(f"A) engine, in process (allocator tuned as the server does: {machine['allocator_tuned']})")
    engine = inprocess.run_engine_bench(batches, preset["timing"])
    plain = inprocess.run_plain_process(report.TARGET_BATCH, preset["timing"])
    for case, fig in plain.items():
        print(f"  plain process  {case:<10} batch {report.TARGET_BATCH}: {fig['img_s']:8.1f} img/s")
    results: dict = {
        "machine": machine,
        "engine": engine,
        "plain_process": plain,
        "ratios": report.engine_ratios(engine),
        "naive_max_abs_diff": inprocess.naive_agreement(),
        "served": None,
    }

    if not args.skip_served:
        print("B) served over HTTP")
        with tempfile.TemporaryDirectory(prefix="vit-bench-") as tmp:
            results["served"] = served.run_served_bench(
                inprocess.make_model(), Path(tmp), args.endpoints.split(","), args.batching.split(","),
                clients, duration, warmup,
            )

    results["toolkit"] = None
    if not args.skip_toolkit:
        print("C) the toolkit: the discard sweep's cost, /rollout while maximizations run")
        results["toolkit"] = {"sweep": toolkit.sweep_cost(preset["timing"]), "busy": None}
        if not args.skip_served:
            with tempfile.TemporaryDirectory(prefix="vit-bench-") as tmp:
                results["toolkit"]["busy"] = toolkit.busy_latency(Path(tmp), args.sessions, duration, warmup)

    results["path"] = None
    if not args.skip_path:
        print("D) the request path: server CPU per request on a near-zero model")
        with tempfile.TemporaryDirectory(prefix="vit-bench-") as tmp:
            results["path"] = path.run_path_bench(
                Path(tmp), path.QUICK if args.quick else path.FULL, args.path_body, args.path_cases.split(","))

    results["faithfulness"] = None
    if not args.skip_faithfulness:
        print("E) the faithfulness option's cost against steps x 2 bare forwards")
        results["faithfulness"] = faithfulness.cost(preset["timing"], preset["faithfulness_steps"])

    results["capture"] = None
    if not args.skip_capture:
        print("F) the capture per family: engine rollout against its own bare forward, one thread")
        results["capture"] = capture.run(args.capture_families.split(","), 2 if args.quick else 16,
                                         2 if args.quick else 8)

    results["actmax"] = None
    if not args.skip_actmax:
        print("G) activation maximization's step against copies x one forward and backward")
        results["actmax"] = actmax_cost.cost(preset["timing"], preset["actmax_copies"])

    results["targets"] = report.targets(engine, results["served"], plain) + path.targets(results["path"])
    results["targets"] += faithfulness.targets(results["faithfulness"])
    machine["loadavg_end"] = os.getloadavg()
    machine["competing_processes"] = sorted(set(machine["competing_processes"]) | set(report.competing_processes()))
    results["settings"] = {
        "command": "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "quick": args.quick, "model": inprocess.ARCH, "seed": inprocess.SEED, "category_id": inprocess.CATEGORY_ID,
        "batches": batches, "clients": clients, "served_duration_s": duration, "served_warmup_s": warmup,
        "timing": preset["timing"], "server_flags": {k: served.BATCHING[k] for k in args.batching.split(",")},
        "path_body": args.path_body, "path_cases": args.path_cases,
        "elapsed_s": time.monotonic() - t0,
    }
    print()
    parts = {"faithfulness": faithfulness.render, "toolkit": toolkit.render, "path": path.render,
             "capture": capture.render, "actmax": actmax_cost.render}
    print(report.render(results, parts))
    report.write(results, Path(args.out), parts)
    print(f"wrote {args.out}/results.json, results.md, MACHINE.md in {results['settings']['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
