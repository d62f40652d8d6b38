"""Process-wide tuning for serving PyTorch on CPUs: how cores are split, and the C allocator.

Cores. With torch's default one replica uses every core through OpenMP, and each parallel op
ends at a barrier. Decoding and HTTP work in the same process (about a tenth of the CPU under
load) keep preempting one of those threads while the others wait at the barrier. Several
single-threaded replicas, each taking its own batch from the model's queue, have no barriers
to stall: on the 2-core box, 2 replicas x 1 thread served /rollout at 16 clients at 26 req/s
against 20-22 for 1 x 2 (four alternating runs each), and /grad-rollout at 13.9 against 11.7.
The price is latency for a lone request, which then runs on one core (p50 85 ms against 70).
Replicas are capped so that big machines do not hold dozens of copies and their activations.

Allocator.
glibc's malloc hands every allocation above its mmap threshold (128 KiB at start, adapting up
to 32 MiB) to a fresh `mmap`, and gives freed memory at the top of a heap back to the kernel
once more than the trim threshold is free. A ViT forward pass allocates and frees megabytes of
activations per layer (with explicit attention, a (B, H, N, N) matrix per block: 7.4 MB for
DeiT-Tiny at batch 16), so each batch pays for page faults and zeroed pages over and over.
Keeping freed memory in the process for the next batch removes that cost; it is the same
remedy as running under jemalloc or tcmalloc, which PyTorch's CPU tuning guide recommends,
without needing LD_PRELOAD.

Measured on the 2-core CPU box (docs/performance.md): the bare DeiT-Tiny forward at batch 16
and the rollout engine both get faster, rollout the most, since it allocates the most.
The price: resident memory stays at the high-water mark of the largest batch instead of
shrinking between batches.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

MAX_AUTO_CPU_REPLICAS = 4


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_cores(cores: int, workers: int) -> int:
    """The cores one of `workers` server processes plans its replicas and threads for: an even
    share, at least one. The processes are not pinned (an idle one leaves its share to the
    others); the split only keeps N processes from starting N times the threads there are cores.
    """
    return max(1, cores // workers)


def cpu_layout(cores: int, replicas: int | None, threads: int | None) -> tuple[int, int]:
    """(replicas, torch intra-op threads) for serving on `cores` CPU cores; None means choose.

    Neither given: one single-threaded replica per core, at most MAX_AUTO_CPU_REPLICAS, which
    then share the cores evenly. Threads given alone: one replica with that many threads.
    Replicas given alone: the cores shared evenly between them.
    """
    if replicas is None:
        replicas = 1 if threads is not None else max(1, min(cores, MAX_AUTO_CPU_REPLICAS))
    if threads is None:
        threads = max(1, cores // replicas)
    return replicas, threads


_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's own maximum: allocations below this come from the heap
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap for reuse


def tune_allocator() -> bool:
    """Make glibc keep freed memory for reuse (see module doc). False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.info("allocator tuning skipped: no glibc mallopt in %s", name)
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.info("allocator tuning skipped: mallopt refused the thresholds")
    return ok
