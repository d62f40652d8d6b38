"""Process-wide tuning for serving PyTorch on CPUs: the C allocator.

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

log = logging.getLogger(__name__)

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
