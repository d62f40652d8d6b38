"""Tensor operations the explanation methods share: small pure functions over captured tensors, batched.

Shapes: B batch, L blocks, H heads, N = P + gh*gw tokens (P prefix tokens: class token first,
then distillation/register tokens), D head dim. No I/O, no HTTP, no model here: only tensors in
and tensors out, on whatever device they arrive.

Definitions (per image; see docs/how-it-works.md):
  fuse(X)      mean, max or min over heads
  discard(F,r) zero the floor(r*N*N) smallest entries of F, never F[0, 0]
  rollout      R = Â_L ... Â_1 with Â_l = rownorm(F_l + I); the map is (e R)[P:] / max, e the explained
               row: e_0 (class token), the mean over the patch tokens, or a pooling head's attention row
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from schemas.requests import Fusion  # the one declaration of the head fusions

_FUSE = {"mean": torch.mean, "max": torch.amax, "min": torch.amin}


def fuse_heads(x: torch.Tensor, fusion: Fusion, out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, ...) -> (B, ...): mean, max or min over the head dimension, into `out` when given."""
    if fusion not in _FUSE:
        raise ValueError(f"unknown head fusion {fusion!r}")
    reduce = _FUSE[fusion]
    return reduce(x, dim=1) if out is None else reduce(x, dim=1, out=out)


def discard_lowest(f: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B, N, N) -> (B, N, N) with the floor(ratio*N*N) smallest entries of each matrix zeroed.

    F[0, 0] (class token to itself) is never zeroed. Selection is by threshold (the k-th
    smallest value, an O(N^2) selection rather than a sort); entries tied with it are zeroed
    too, which only matters for exact ties (zeros among them change nothing). `f` may be
    modified in place: callers pass tensors they just made.
    """
    b, n, _ = f.shape
    k = math.floor(ratio * n * n)
    if k <= 0:
        return f
    flat = f.reshape(b, n * n)
    cls_to_cls = flat[:, 0].clone()
    _zero_at_or_below(flat, kth_smallest(flat, k))
    flat[:, 0] = cls_to_cls
    return flat.view(b, n, n)


def _zero_at_or_below(flat: torch.Tensor, threshold: torch.Tensor) -> None:
    """flat (B, M), threshold (B, 1): zero, in place, every entry <= its row's threshold.

    On the CPU one `threshold_` pass per row (the thresholds are on the host already); elsewhere
    a mask and a fill, with no host round trip.
    """
    (_zero_by_row if flat.device.type == "cpu" else _zero_by_mask)(flat, threshold)


def _zero_by_row(flat: torch.Tensor, threshold: torch.Tensor) -> None:
    for row, t in zip(flat, threshold[:, 0].tolist()):
        torch.nn.functional.threshold_(row, t, 0.0)  # x if x > t else 0


def _zero_by_mask(flat: torch.Tensor, threshold: torch.Tensor) -> None:
    flat.masked_fill_(flat <= threshold, 0.0)


def kth_smallest(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, M) -> (B, 1): the k-th smallest value (1-based) of each row.

    On the CPU, numpy's introselect is about ten times faster than torch.kthvalue for rows of
    tens of thousands of values, and it releases the GIL, so the rows are split over torch's
    intra-op thread count; on CUDA torch.kthvalue runs on the device.
    """
    return _kth_numpy(x, k) if x.device.type == "cpu" else _kth_torch(x, k)


def _kth_numpy(x: torch.Tensor, k: int) -> torch.Tensor:
    rows = x.detach().numpy()
    parts = min(torch.get_num_threads(), rows.shape[0])
    if parts <= 1:
        chunks = [_kth_rows(rows, k)]
    else:
        chunks = list(_select_pool(parts).map(_kth_rows, np.array_split(rows, parts), [k] * parts))
    return torch.from_numpy(np.concatenate(chunks)).to(x.dtype)


@functools.cache
def _select_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="kth")


def _kth_rows(rows: np.ndarray, k: int) -> np.ndarray:
    """(b, M) -> (b, 1) by introselect on a copy (np.partition never changes its input)."""
    return np.partition(rows, k - 1, axis=-1)[:, k - 1 : k]


def _kth_torch(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.kthvalue(k, dim=-1, keepdim=True).values


def explained(pooling: str, prefix: int, n: int, like: torch.Tensor, pool: torch.Tensor | None = None,
              skip: int = 0) -> torch.Tensor:
    """The explained row e (B, N) over the N tokens, in like's dtype and device (B = like.shape[0]):
    token  e_0, the class token
    avg    1 / (N - P) on each patch token (the mean of the patch tokens' rows)
    map    the pooling head's row pool (B, N - skip), its keys being the tokens skip.. (zero before)"""
    e = like.new_zeros(like.shape[0], n)
    if pooling == "map":
        e[:, skip:] = pool
    elif pooling == "avg":
        e[:, prefix:] = 1.0 / (n - prefix)
    else:
        e[:, 0] = 1.0
    return e


def rollout_row(weights: Sequence[torch.Tensor], e: torch.Tensor | None = None) -> torch.Tensor:
    """e^T Â_L ... Â_1, with Â_l = rownorm(W_l + I), for W_l (B, N, N) >= 0 in block order and the
    explained row e (B, N) (None: e_0, row 0).

    Computed as a vector times the chain, last block first: O(L*N^2), never an N x N product.
    With d = rowsum(W) + 1: v^T Â = (v/d)^T W + (v/d)^T.
    """
    b, n, _ = weights[0].shape
    if e is None:
        v = torch.zeros(b, n, dtype=weights[0].dtype, device=weights[0].device)
        v[:, 0] = 1.0
    else:
        v = e.to(weights[0].dtype)
    for w in reversed(weights):
        u = v / (w.sum(dim=-1) + 1.0)  # (B, N)
        v = torch.bmm(u.unsqueeze(1), w).squeeze(1) + u
    return v


def normalize_max(x: torch.Tensor) -> torch.Tensor:
    """Divide each map (last two dims) by its maximum; an all-zero map stays zero."""
    peak = x.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 0, x / torch.where(peak > 0, peak, 1.0), torch.zeros_like(x))


def patch_map(row: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """(..., N) token values -> (..., gh, gw) over the patch tokens, dropping the P prefix tokens."""
    return row[..., prefix:].reshape(*row.shape[:-1], *grid)


def rollout(fused: Sequence[torch.Tensor], discard_ratio: float, prefix: int, grid: tuple[int, int],
            e: torch.Tensor | None = None) -> torch.Tensor:
    """Attention Rollout from each block's weights F_l (B, N, N) >= 0 -> masks (B, gh, gw) in [0, 1].

    W_l = discard(F_l, ratio), then the explained row e (B, N) (None: row 0) of the rollout over the
    patches, divided by its max. The F_l may be changed in place. Rollout and gradient rollout differ
    only in their F_l (and their pooling head's row, within e).
    """
    weights = [discard_lowest(f, discard_ratio) for f in fused]
    return normalize_max(patch_map(rollout_row(weights, e), prefix, grid))


def unit_pixels(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 pixel values in [0, 1]."""
    # a read-only array (e.g. one made from bytes) is copied: torch takes only writable ones without a warning
    arr = np.ascontiguousarray(pixels) if pixels.flags.writeable else np.array(pixels, order="C")
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
