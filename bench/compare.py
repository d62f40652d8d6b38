"""Is one version of the service faster than another? Two servers, alternating short windows.

    git worktree add /tmp/before <commit>
    python -m bench.compare /tmp/before . --endpoints rollout-json,rollout-png --reps 8

On a shared machine the same run can be 1.5x slower from one minute to the next, which swamps
a 5-10% change between two separate `make bench` runs. Here both servers (each started from its
own source tree, with the service's defaults) stay up side by side, and a separate client
process loads one, then the other, for `--duration` seconds at a time, swapping which goes first
every repetition, so both see the same drift. Prints req/s per window, the medians, and how
many windows the second tree won. The idle server uses no CPU while the other is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench import inprocess, served
from bench.client import ENDPOINTS


def compare(trees: list[Path], endpoints: list[str], clients: int, reps: int, duration: float, warmup: float,
            workdir: Path, log=print) -> dict[str, list[list[float]]]:
    """{endpoint: [req/s per window of trees[0], of trees[1]]}, both serving the same random-weight model."""
    workdir = workdir.resolve()  # the servers run in their trees; the model path must not depend on it
    spec = served.save_model(inprocess.make_model(), workdir / "model")
    image = workdir / "bench.png"
    image.write_bytes(served.bench_png())
    out: dict[str, list[list[float]]] = {}
    with contextlib.ExitStack() as stack:
        ports = []
        for i, tree in enumerate(trees):
            # This tree's `service` package, not the installed one nor the current directory's: `python -m`
            # puts its working directory ahead of PYTHONPATH on sys.path, so the server runs inside the tree.
            # Only the tree's `service` is used, so a tree from before the bench moved out of it serves too.
            tree = tree.resolve()
            env = {"PYTHONPATH": str(tree)}
            port, _ = stack.enter_context(served.server(spec, [], workdir / f"server-{i}.log", env=env, cwd=tree))
            ports.append(port)
        for endpoint in endpoints:
            figs: list[list[float]] = [[] for _ in trees]
            for rep in range(reps):
                order = list(enumerate(ports))
                for i, port in order if rep % 2 == 0 else order[::-1]:
                    figs[i].append(served.run_client(port, endpoint, image, clients, duration, warmup)["req_s"])
            for tree, values in zip(trees, figs):
                log(f"{endpoint:<18} {str(tree):<30} median {statistics.median(values):6.1f} req/s   "
                    + " ".join(f"{v:.1f}" for v in values))
            log(f"{endpoint:<18} {trees[1]} faster in {sum(b > a for a, b in zip(*figs))} of {reps} windows")
            out[endpoint] = figs
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path, help="source tree of the first version (a git worktree)")
    p.add_argument("after", type=Path, help="source tree of the second version")
    p.add_argument("--endpoints", default="rollout-json", help=f"subset of {','.join(ENDPOINTS)}")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--reps", type=int, default=8, help="windows per tree and endpoint")
    p.add_argument("--duration", type=float, default=5.0, help="timed seconds per window")
    p.add_argument("--warmup", type=float, default=1.0, help="untimed seconds before each window")
    args = p.parse_args(argv)
    for tree in (args.before, args.after):
        if not (tree / "service" / "__init__.py").exists():
            p.error(f"{tree} has no service/ package")
    with tempfile.TemporaryDirectory(prefix="vit-compare-") as tmp:
        compare([args.before, args.after], args.endpoints.split(","), args.clients, args.reps, args.duration,
                args.warmup, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
