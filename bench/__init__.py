"""`make bench`: how fast the engine and the HTTP service are on this machine, against targets.

    python -m bench            # full run (~10-15 min on 2 CPU cores), writes docs/bench/
    python -m bench --quick    # a short run for development (figures are rough)

Parts (one module each):
  inprocess  the engine in this process, next to a bare forward, the gradient floor, a forward
             with a full backward, and the naive baseline (naive.py), in images per second
  served     a real `python -m service serve` process loaded by a separate client process
             (client.py), in requests per second and latency percentiles
  toolkit    part C: the discard sweep against one request per ratio, and /rollout latency
             while activation maximizations run
  report     the targets (PASS/MISS), the printed table, results.json and MACHINE.md
  profile    not part of the run: `python -m bench.profile`, the per-op profile of a case
  compare    not part of the run: `python -m bench.compare BEFORE AFTER`, two versions'
             servers side by side in alternating windows, for changes smaller than the drift
"""
