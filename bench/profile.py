"""Where an engine case spends its time, op by op: the profile behind docs/performance.md.

    python -m bench.profile                          # bare and rollout, batch 16, 2 threads
    python -m bench.profile --cases bare,grad_rollout,grad_floor --threads 1 --batch 8

Each case (see inprocess.py) runs two warm-up batches, then `--reps` batches under
torch.profiler; prints the self CPU time of the busiest ops per case. Not part of `make bench`:
profiling slows the run down, and its per-op figures are for reading, not for ratios.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch.profiler import ProfilerActivity, profile

from bench import inprocess
from service import runtime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="bare,rollout", help=f"subset of {','.join(inprocess.CASES)}")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rows", type=int, default=14, help="ops shown per case")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    runtime.tune_allocator()  # as the server does
    cases = inprocess.build_cases(inprocess.make_model())
    x = inprocess.make_images(args.batch)
    for name in args.cases.split(","):
        fn = cases[name]
        fn(x)
        fn(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.reps):
                fn(x)
        print(f"\n{name}: {args.reps} batches of {args.batch}, {args.threads} thread(s)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
