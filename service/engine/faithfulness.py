"""Faithfulness of a map: deletion and insertion curves of the explained class (perturbation tests).

Definitions (per image; README "Faithfulness"), on the model's input x (3, H, W), after resizing
and normalisation, with P = gh * gw patches and the map m (gh, gw):

  order       the patches by m, highest first, ties by lower row-major index; `least` reverses it
  n_s         floor(s * P / k) patches removed at step s = 0 .. k
  removal     mean: a removed patch's pixels become x's per-channel mean over the whole image;
              blur: they become those of x blurred by a Gaussian of sigma = one patch (in pixels,
              per axis), taps at integer offsets |d| <= ceil(4 sigma), and at the image's border
              the taps that fall outside are dropped and the rest renormalised to sum 1
              (equivalently blur(x) / blur(1) with zeros outside): computed once per image
  deletion    x with the first n_s patches of the order removed
  insertion   the fully removed image with the first n_s patches of the order put back
  curve       softmax probability of the explained class at each step: k + 1 values
  area        trapezoid rule over s / k in [0, 1]

A pixel (r, c) belongs to patch (floor(r * gh / H), floor(c * gw / W)).

Every perturbed copy of every image that asked goes through the model in chunks of `chunk`
images, whatever method, image or request they come from; copies that are equal by definition
(the image itself, the fully removed image, equal counts when k > P) are computed once per image
and class. Plain forward passes: no capture, under inference_mode. Between chunks the copies of
an image whose request has ended are dropped (its deadline passed, its client left).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TRUNCATE = 4.0  # the blur's taps reach ceil(TRUNCATE * sigma) pixels


@dataclass(frozen=True)
class Ask:
    """One image's request: score `maps` (F, gh, gw) (one per frame) for `classes` (one per frame)."""

    maps: torch.Tensor  # (F, gh, gw)
    classes: tuple[int, ...]  # (F,)
    steps: int
    removal: str  # blur | mean
    order: str  # most | least


@dataclass(frozen=True)
class Curves:
    """The scores of one map."""

    class_id: int
    steps: int
    removal: str
    order: str
    deletion: list[float]  # k + 1 values
    insertion: list[float]
    deletion_auc: float
    insertion_auc: float

    def to_json(self) -> dict:
        return {"class_id": self.class_id, "steps": self.steps, "removal": self.removal, "order": self.order,
                "deletion": self.deletion, "insertion": self.insertion,
                "deletion_auc": self.deletion_auc, "insertion_auc": self.insertion_auc}


# -- the pieces ------------------------------------------------------------------------------------
def ranks(maps: torch.Tensor, order: str) -> torch.Tensor:
    """(F, gh, gw) -> (F, P) long: each patch's position in the order (0 = removed first)."""
    flat = maps.reshape(maps.shape[0], -1).float()
    idx = torch.argsort(-flat, dim=-1, stable=True)  # highest first, ties by lower index
    if order == "least":
        idx = idx.flip(-1)
    elif order != "most":
        raise ValueError(f"unknown order {order!r}")
    out = torch.empty_like(idx)
    out.scatter_(-1, idx, torch.arange(idx.shape[-1], device=idx.device).expand_as(idx))
    return out


def counts(steps: int, patches: int) -> list[int]:
    """n_s = floor(s * P / k) for s = 0 .. k."""
    return [s * patches // steps for s in range(steps + 1)]


def area(curve: Sequence[float]) -> float:
    """Trapezoid rule over s / k in [0, 1]."""
    k = len(curve) - 1
    return sum((a + b) / 2 for a, b in zip(curve[:-1], curve[1:])) / k


def patch_of_pixel(size: tuple[int, int], grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(H, W) long: the row-major index of the patch each pixel belongs to."""
    (h, w), (gh, gw) = size, grid
    rows = torch.arange(h, device=device) * gh // h  # (H,)
    cols = torch.arange(w, device=device) * gw // w  # (W,)
    return rows[:, None] * gw + cols[None, :]


def gaussian_blur(x: torch.Tensor, sigma: tuple[float, float]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W): separable Gaussian of sigma (sy, sx) pixels, renormalised at the border."""
    out = x.float()
    for axis, s in ((2, sigma[0]), (3, sigma[1])):
        r = math.ceil(TRUNCATE * s)
        d = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)
        taps = torch.exp(-(d**2) / (2 * s * s))
        taps = taps / taps.sum()  # (2r + 1,)
        c = out.shape[1]
        shape = (c, 1, 2 * r + 1, 1) if axis == 2 else (c, 1, 1, 2 * r + 1)
        pad = (r, 0) if axis == 2 else (0, r)
        ones = torch.ones(1, 1, *out.shape[2:], device=x.device)
        norm = F.conv2d(ones, taps.view(1, 1, *shape[2:]), padding=pad)  # (1, 1, H, W): the taps inside
        out = F.conv2d(out, taps.view(1, 1, *shape[2:]).expand(shape).contiguous(), padding=pad, groups=c) / norm
    return out.to(x.dtype)


def removed(x: torch.Tensor, how: str, patch: tuple[float, float]) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, H, W): the fully removed image of each input."""
    if how == "mean":
        return x.mean(dim=(-2, -1), keepdim=True).expand_as(x)
    if how == "blur":
        return gaussian_blur(x, patch)
    raise ValueError(f"unknown removal {how!r}")


# A job's stop signal: None while its request still wants the answer, else the error it ended with
# (the deadline's 504, the client's disconnect); each Job carries one (service/engine/contract.py).
Stop = Callable[[], "BaseException | None"]

# -- scoring a batch -------------------------------------------------------------------------------
class _ChunkStopped(Exception):
    """Every image of the chunk in flight has stopped: the rest of its forward pass is skipped."""


@contextlib.contextmanager
def _between_blocks(blocks: Sequence[nn.Module], stops: Sequence[Stop | None] | None,
                    between: Callable[[], None] | None) -> Iterator[list[int]]:
    """While scoring, before each block of the model (its anatomy's `blocks`): a check that the images of the
    chunk in flight (the list yielded, set per chunk) have not all stopped, so that a chunk of nobody's
    copies ends within a block, not a whole forward pass, after its requests end; then `between`, out
    of inference mode, so that a request waiting for the replica waits for a block, not a chunk. The
    forwards that `between` runs pass the hooks unchecked."""
    chunk_of: list[int] = []
    stops = stops if stops and any(s is not None for s in stops) else None
    if (stops is None and between is None) or not blocks:
        yield chunk_of
        return
    inside = False

    def check(_module: nn.Module, _args: tuple) -> None:
        nonlocal inside
        if inside or not chunk_of:
            return
        if stops is not None and all(stops[i] is not None and stops[i]() is not None for i in chunk_of):
            raise _ChunkStopped()
        if between is not None:
            inside = True
            try:
                with torch.inference_mode(False):
                    between()
            finally:
                inside = False

    handles = [b.register_forward_pre_hook(check) for b in blocks]
    try:
        yield chunk_of
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class _Copy:
    """One perturbed input: image `image`, showing x where lo <= rank < hi (frame `frame`'s ranks), else removed."""

    image: int
    frame: int  # row of the stacked ranks
    lo: int
    hi: int
    class_id: int


def score(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, asks: Sequence[Ask],
          grid: tuple[int, int], chunk: int, stops: Sequence[Stop | None] | None = None,
          between: Callable[[], None] | None = None,
          blocks: Sequence[nn.Module] = ()) -> list[list[Curves] | BaseException]:
    """x (B, 3, H, W) the inputs the model sees, asks[i] image i's maps -> per image, per frame, Curves.
    `forward` maps inputs to logits; `blocks` are the model's blocks, where a stopped chunk is cut short.

    Between chunks, stops[i] (when given) says whether image i's request has ended: its copies not
    yet run are dropped, and its entry is the error it stops with, not curves; the other images' copies
    run on (each copy's probability is its own, whatever chunk it runs in). `between` is
    called between chunks and between the blocks of a chunk's forward pass, outside inference mode
    (the batcher answers waiting requests there)."""
    b, _, h, w = x.shape
    gh, gw = grid
    p = gh * gw
    device = x.device
    pix = patch_of_pixel((h, w), grid, device)  # (H, W)
    base = torch.empty_like(x)
    for how in {a.removal for a in asks}:
        idx = [i for i, a in enumerate(asks) if a.removal == how]
        base[idx] = removed(x[idx], how, (h / gh, w / gw)).to(x.dtype)
    rank_rows, copies, keys = [], [], {}
    plan: list[list[tuple[list[int], list[int]]]] = []  # per image, per frame: (deletion, insertion) copy ids

    def copy(c: _Copy, shared: bool) -> int:
        key = (c.image, c.lo, c.hi, c.class_id) if shared else c
        if key not in keys:
            keys[key] = len(copies)
            copies.append(c)
        return keys[key]

    for i, a in enumerate(asks):
        r = ranks(a.maps.to(device), a.order)  # (F, P)
        plan.append([])
        for f, cls in enumerate(a.classes):
            row = len(rank_rows)
            rank_rows.append(r[f])
            dele, ins = [], []
            for n in counts(a.steps, p):
                # Deletion shows x where rank >= n; insertion where rank < n. The whole image
                # (0, P) and the whole removal (0, 0) do not depend on the order: shared per image and class.
                for out, lo, hi in ((dele, n, p), (ins, 0, n)):
                    if lo == 0 and hi == p:
                        out.append(copy(_Copy(i, row, 0, p, cls), shared=True))
                    elif lo == hi:
                        out.append(copy(_Copy(i, row, 0, 0, cls), shared=True))
                    else:
                        out.append(copy(_Copy(i, row, lo, hi, cls), shared=False))
            plan[-1].append((dele, ins))
    rank_rows = torch.stack(rank_rows)  # (rows, P)
    probs = torch.empty(len(copies), dtype=torch.float64, device=device)
    todo = list(range(len(copies)))  # the copies still to run, in order
    stopped: dict[int, BaseException] = {}  # image -> the error its request ended with
    with _between_blocks(blocks, stops, between) as chunk_of:
        while todo:
            if stops is not None:
                ended = {i: why for i, stop in enumerate(stops)
                         if i not in stopped and stop is not None and (why := stop())}
                if ended:
                    stopped |= ended
                    todo = [j for j in todo if copies[j].image not in stopped]
                    continue
            ids, todo = todo[:chunk], todo[chunk:]
            part = [copies[j] for j in ids]
            chunk_of[:] = sorted({c.image for c in part})
            try:
                with torch.inference_mode():
                    img = torch.tensor([c.image for c in part], device=device)
                    rows = torch.tensor([c.frame for c in part], device=device)
                    lo = torch.tensor([c.lo for c in part], device=device)[:, None, None]
                    hi = torch.tensor([c.hi for c in part], device=device)[:, None, None]
                    pr = rank_rows[rows][:, pix]  # (n, H, W) each pixel's patch's rank
                    show = ((pr >= lo) & (pr < hi))[:, None]  # (n, 1, H, W)
                    inputs = torch.where(show, x[img], base[img])  # (n, 3, H, W)
                    logits = forward(inputs).double()  # (n, classes)
                    cls = torch.tensor([c.class_id for c in part], device=device)
                    probs[torch.tensor(ids, device=device)] = logits.softmax(dim=-1).gather(1, cls[:, None])[:, 0]
            except _ChunkStopped:  # every image of the chunk has stopped (the check is monotonic: it stays so)
                stopped |= {i: stops[i]() for i in chunk_of if i not in stopped}
                todo = [j for j in todo if copies[j].image not in stopped]
                continue
            chunk_of.clear()  # no chunk in flight: the forwards `between` runs are not checked against it
            if between is not None and todo:
                between()
    values = probs.cpu().tolist()
    out: list[list[Curves] | BaseException] = []
    for i, (a, frames) in enumerate(zip(asks, plan)):
        if i in stopped:
            out.append(stopped[i])
            continue
        per = []
        for cls, (dele, ins) in zip(a.classes, frames):
            d, n = [values[j] for j in dele], [values[j] for j in ins]
            per.append(Curves(class_id=cls, steps=a.steps, removal=a.removal, order=a.order, deletion=d,
                              insertion=n, deletion_auc=area(d), insertion_auc=area(n)))
        out.append(per)
    return out
