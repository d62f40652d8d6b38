"""Run one batch of jobs through one resident model: one forward pass, then each job's method.

The engine knows methods only by what their jobs declare (service/engine/contract.py):

    plain pass     under torch.inference_mode: attention reduced as it is made, q/k, block outputs
    autograd pass  every block's whole attention and its gradient w.r.t. each image's class logit
    step           long work (`Stepwise`): the gradient of each image's objective w.r.t. its input

`run` answers a batch of one-pass jobs: it is split at most once, between the plain and the
autograd pass. Within a pass every image gets its own method and parameters, and jobs with equal
parameters are computed together; nothing about an image depends on its batch neighbours.
`step` takes one step of a batch of long-work states. A job whose request has ended (its
deadline passed, its client left: `Job.stop`) is left out of the pass, and its faithfulness
scoring stops at the next chunk.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn

from service.engine import adapters, faithfulness
from service.engine.capture import capture, install
from service.engine.contract import Captured, Job, ModelShape, Needs, Prediction, Reduction, Result, Stop

TOP_K = 5
# Perturbed copies per forward pass of the faithfulness curves (service/engine/faithfulness.py).
FAITHFULNESS_CHUNK = {"cpu": 32, "cuda": 256}


class Engine:
    """A model resident on one device, hooked for capture once, answering batches of jobs."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype = torch.float32,
                 name: str = "model") -> None:
        self.device = device
        self.dtype = dtype
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.anatomy = adapters.describe(self.model)  # UnsupportedModel when it cannot be explained
        an = self.anatomy
        self.num_layers = an.layers
        self.num_heads = an.heads
        self.head_dim = an.head_dim
        self.prefix = an.prefix
        self.grid = an.grid
        self.input_size = an.input_size
        self.shape = ModelShape(
            name=name, grid=an.grid, prefix=an.prefix, layers=an.layers, heads=an.heads, head_dim=an.head_dim,
            embed_dim=an.embed_dim, input_size=an.input_size, labels=an.labels, mean=an.mean, std=an.std,
            pooling=an.pooling, pool_skip=an.pool_skip,
            mlp_dim=int(getattr(getattr(getattr(an.blocks[0], "mlp", None), "fc1", None), "out_features", 0)),
        )
        self._capture = install(an)
        self.forward = an.forward  # (B, 3, H, W) -> logits (B, classes)
        # the input normalisation, made once on the device (prepare): (1, 3, 1, 1) each
        self._mean = torch.tensor(self.shape.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.shape.std, device=device).view(1, 3, 1, 1)

    # -- public -----------------------------------------------------------------------------
    def run(self, images: torch.Tensor, jobs: Sequence[Job],
            between: Callable[[], None] | None = None) -> list[Result | BaseException]:
        """jobs[i] is image i's request. images, on any device, either
        (B, H, W, 3) uint8 pixels at the input size, as decoding makes them (`prepare` turns them
        into the model's input on the model's device, the whole batch at once), or
        (B, 3, H, W) float, the model's input already (scaled and normalised).

        A job whose request has ended (`Job.stop`) before the pass is left out of it, and one that
        ends while its maps are scored stops at the next chunk: its entry is the error it stopped with, and
        its neighbours are answered as they would be without it. `between` is called between the
        chunks of the scoring (the batcher answers waiting requests there: service/batching.py)."""
        if images.shape[0] != len(jobs):
            raise ValueError(f"{images.shape[0]} images for {len(jobs)} jobs")
        ended = {i: why for i, j in enumerate(jobs) if (why := j.stopped())}
        if ended:
            answers: dict[int, Result | BaseException] = dict(ended)
            live = [i for i in range(len(jobs)) if i not in ended]
            if live:
                answers |= dict(zip(live, self.run(images[live], [jobs[i] for i in live], between)))
            return [answers[i] for i in range(len(jobs))]
        x = self.prepare(images)
        needs = [j.method.needs(j.params, self.shape) for j in jobs]
        results: list = [None] * len(jobs)
        grad_idx = [i for i, n in enumerate(needs) if n.grad_class is not None]
        plain_idx = [i for i, n in enumerate(needs) if n.grad_class is None]
        for idx, runner in ((plain_idx, self._run_plain), (grad_idx, self._run_grad)):
            if idx:
                part = x[idx] if len(idx) < len(jobs) else x
                for i, r in zip(idx, runner(part, [jobs[i] for i in idx], [needs[i] for i in idx])):
                    results[i] = r
        asks = {i: j.method.faithfulness(j.params, results[i], self.shape) for i, j in enumerate(jobs)}
        scored = [i for i, ask in asks.items() if ask is not None]
        if scored:
            self._score(x[scored] if len(scored) < len(jobs) else x, [asks[i] for i in scored], scored, results,
                        [jobs[i].stop for i in scored], between)
        return results

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 pixels -> (B, 3, H, W) the model's input on its device and in its dtype:
        one copy to the device (pinned and non-blocking on CUDA), then x / 255, (x - mean) / std there
        (the same float32 operations, in the same order, as torchvision's ToTensor and Normalize).
        A float tensor is taken as the model's input already and only moved."""
        if images.dtype != torch.uint8:
            return self._to_device(images)
        if self.device.type == "cuda" and images.device.type == "cpu":
            images = images.pin_memory().to(self.device, non_blocking=True)
        # uint8 made (B, 3, H, W)-contiguous first: the arithmetic then broadcasts mean and std over
        # whole planes, not over an inner dimension of 3 (half the time on the CPU)
        pixels = images.to(self.device).permute(0, 3, 1, 2).contiguous().float().div_(255.0)  # in [0, 1]
        return pixels.sub_(self._mean).div_(self._std).to(self.dtype)

    def warmup(self, jobs: Sequence[Job], batch_sizes: Sequence[int] = (1,)) -> None:
        """Run these jobs (one of each pass, say) once, so that the first real request does not pay
        for lazy initialisation."""
        h, w = self.input_size
        for b in batch_sizes:
            x = torch.zeros(b, h, w, 3, dtype=torch.uint8)
            for j in jobs:
                self.run(x, [j] * b)

    def step(self, states: Sequence, jobs: Sequence[Job]) -> list[float]:
        """One step of long work (`Stepwise` methods) for each state, in place.

        Each job's method makes this step's input (`shifted`): one picture or several copies, each
        a row of the batch; every row runs through the model once, and each method updates its own
        state with its own rows' gradients and values (`update`).
        -> each image's value for the step (what `update` returns, else its rows' mean).
        """
        made = [j.method.shifted(j.params, s) for j, s in zip(jobs, states)]  # (3, H, W) or (c, 3, H, W)
        counts = [len(x) if x.dim() == 4 else 1 for x in made]
        rows = torch.cat([x if x.dim() == 4 else x[None] for x in made])  # (sum of counts, 3, H, W)
        value, grad = self._input_gradient(rows, [j for j, n in zip(jobs, counts) for _ in range(n)])
        grad, value = grad.float().cpu(), value.cpu().tolist()
        out, start = [], 0
        for j, s, x, n in zip(jobs, states, made, counts):
            mine = slice(start, start + n)
            start += n
            g, v = (grad[mine], value[mine]) if x.dim() == 4 else (grad[mine.start], value[mine.start])
            reported = j.method.update(j.params, s, g, v)
            out.append(reported if reported is not None else (sum(v) / n if x.dim() == 4 else v))
        return out

    # -- passes -----------------------------------------------------------------------------
    def _input_gradient(self, pixels: torch.Tensor, jobs: Sequence[Job]) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels (B, 3, H, W) in [0, 1] -> (each image's objective value (B,), the gradient of its
        value - penalty w.r.t. its pixels (B, 3, H, W)). The objectives are the methods'
        (`objective`); the weights never require grad."""
        needs = [j.method.needs(j.params, self.shape) for j in jobs]
        x = self._to_device(pixels).detach().requires_grad_(True)
        qk = frozenset().union(*(n.qk for n in needs))
        features = frozenset().union(*(n.features for n in needs))
        mlp = frozenset().union(*(n.mlp for n in needs))
        with torch.enable_grad(), capture(qk_layers=qk, feature_layers=features, mlp_layers=mlp) as store:
            logits = self.forward(self.shape.normalize(x))
            value = torch.zeros(len(jobs), device=x.device)
            loss = torch.zeros(len(jobs), device=x.device)
            for idx in _group(jobs).values():
                first = jobs[idx[0]]
                n = needs[idx[0]]
                c = _captured(logits, idx, len(jobs), q=_pick(store.q, n.qk), k=_pick(store.k, n.qk),
                              features=_pick(store.features, n.features), mlp=_pick(store.mlp, n.mlp))
                v, reg = first.method.objective(first.params, c, x[idx], self.shape)
                value[idx] = v.float()
                loss[idx] = (v - reg).float()
            (grad,) = torch.autograd.grad(loss.sum(), x)  # images are independent: sum of their own losses
        return value.detach(), grad.detach()

    def _score(self, x: torch.Tensor, asks: Sequence[faithfulness.Ask], idx: list[int], results: list,
               stops: Sequence[Stop | None], between: Callable[[], None] | None) -> None:
        """The faithfulness curves that `asks` name of the maps of results[idx], whose inputs are x
        (b, 3, H, W): all of their perturbed copies through the model together, in chunks; an image
        whose request ends meanwhile (stops) gets the error it stopped with instead of its result."""
        chunk = FAITHFULNESS_CHUNK.get(x.device.type, 32)
        scored = faithfulness.score(self.forward, x, asks, self.grid, chunk, stops, between, self.anatomy.blocks)
        for i, curves in zip(idx, scored):
            if isinstance(curves, BaseException):
                results[i] = curves
            else:
                results[i] = replace(results[i], faithfulness=curves)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory().to(self.device, non_blocking=True)
        return x.to(device=self.device, dtype=self.dtype)

    def _run_plain(self, x: torch.Tensor, jobs: Sequence[Job], needs: Sequence[Needs]) -> list[Result]:
        reduced = _Reduced(needs)
        attn_layers = frozenset().union(*(n.layers for n in needs if n.reduce is not None))
        qk = frozenset().union(*(n.qk for n in needs))
        features = frozenset().union(*(n.features for n in needs))
        with torch.inference_mode(), capture(attn_layers, qk, take=reduced, feature_layers=features) as store:
            logits = self.forward(x)
            maps: list = [None] * len(jobs)
            for idx in _group(jobs).values():
                first = jobs[idx[0]]
                n = needs[idx[0]]  # equal parameters, equal needs
                c = _captured(logits, idx, len(jobs), reduced=reduced.of(n), q=_pick(store.q, n.qk),
                              k=_pick(store.k, n.qk), features=_pick(store.features, n.features))
                _store(maps, idx, first.method.compute(first.params, c, self.shape))
            preds = _top_k(logits)
        return [Result(maps=m, predictions=p) for m, p in zip(maps, preds)]

    def _run_grad(self, x: torch.Tensor, jobs: Sequence[Job], needs: Sequence[Needs]) -> list[Result]:
        layers = [*range(self.num_layers), *sorted(self.shape.pool)]  # the blocks, then the pooling head if any
        # The image requires grad only so that autograd records a graph: the weights never do,
        # and torch.autograd.grad below walks back only as far as the attention tensors.
        x = x.detach().requires_grad_(True)
        with torch.enable_grad(), capture(attn_layers=frozenset(layers)) as store:
            logits = self.forward(x)
            cats = torch.tensor([n.grad_class for n in needs], device=logits.device)
            target = logits.gather(1, cats[:, None]).sum()  # images are independent: sum of own logits
            attn = [store.attn[b] for b in layers]
            grads = torch.autograd.grad(target, attn)  # per block dy/dA (B, H, Nq, N)
        with torch.no_grad():
            attn = [a.detach().float() for a in attn]
            grads = [g.float() for g in grads]
            logits = logits.detach()
            maps: list = [None] * len(jobs)
            for idx in _group(jobs).values():
                first = jobs[idx[0]]
                c = _captured(logits, idx, len(jobs), attn=attn, grads=grads)
                _store(maps, idx, first.method.compute(first.params, c, self.shape))
            preds = _top_k(logits)
        return [Result(maps=m, predictions=p) for m, p in zip(maps, preds)]


class _Reduced:
    """What the plain pass keeps of each block's attention, reduced as it is made (capture's `take`).

    Each image's job names its Reduction (e.g. heads fused by max, or the class token's row) and
    the blocks it needs. Per kind of reduction and block, one (B, ...) buffer holds the rows of the
    images that asked for it; other rows are left unset and never read. Runs of consecutive images
    with the same reduction in a chunk are reduced together.
    """

    def __init__(self, needs: Sequence[Needs]) -> None:
        self.needs = needs
        self.buffers: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)

    def __call__(self, block: int, rows: slice, attn: torch.Tensor) -> None:
        for start, stop, reduce in _runs(self.needs, block, rows):
            a = attn[start - rows.start : stop - rows.start].float()  # (b, H, Nq, N)
            reduce(a, out=self._buffer(reduce, block, a)[start:stop])  # straight into the buffer: no temporary

    def _buffer(self, reduce: Reduction, block: int, a: torch.Tensor) -> torch.Tensor:
        store = self.buffers[reduce.buffer]
        if block not in store:
            _, h, nq, n = a.shape
            store[block] = a.new_empty(len(self.needs), *reduce.shape(h, nq, n))
        return store[block]

    def of(self, needs: Needs) -> dict[int, torch.Tensor]:
        """block -> the whole-batch buffer of the blocks and the kind of reduction these needs name."""
        if needs.reduce is None:
            return {}
        return _pick(self.buffers.get(needs.reduce.buffer, {}), needs.layers)


def _runs(needs: Sequence[Needs], block: int, rows: slice) -> list[tuple[int, int, Reduction]]:
    """(start, stop, reduction) for each run of consecutive images within rows that want this block reduced alike."""
    out: list[tuple[int, int, Reduction]] = []
    for i in range(rows.start, rows.stop):
        reduce = needs[i].reduce if block in needs[i].layers else None
        if reduce is None:
            continue
        if out and out[-1][1] == i and out[-1][2] == reduce:
            out[-1] = (out[-1][0], i + 1, reduce)
        else:
            out.append((i, i + 1, reduce))
    return out


def _group(jobs: Sequence[Job]) -> dict[tuple, list[int]]:
    """Indices of the jobs, grouped by key: equal methods and parameters (per-image ones aside)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, j in enumerate(jobs):
        groups[j.key].append(i)
    return groups


def _captured(logits: torch.Tensor, idx: list[int], batch: int, *, reduced=None, attn=None, grads=None,
              q=None, k=None, features=None, mlp=None) -> Captured:
    """What the pass captured, cut to the batch rows idx (no copy when that is the whole batch)."""
    whole = len(idx) == batch

    def cut(t: torch.Tensor) -> torch.Tensor:
        return t if whole else t[idx]

    return Captured(
        logits=cut(logits),
        reduced={b: cut(t) for b, t in (reduced or {}).items()},
        attn=[cut(t) for t in attn or []],
        grads=[cut(t) for t in grads or []],
        q={b: cut(t) for b, t in (q or {}).items()},
        k={b: cut(t) for b, t in (k or {}).items()},
        features={b: cut(t) for b, t in (features or {}).items()},
        mlp={b: cut(t) for b, t in (mlp or {}).items()},
    )


def _pick(store: dict[int, torch.Tensor], layers: frozenset[int]) -> dict[int, torch.Tensor]:
    return {b: store[b] for b in sorted(layers)}


def _store(maps: list, idx: list[int], out: torch.Tensor | None) -> None:
    if out is not None:
        for i, m in zip(idx, out.detach().cpu().numpy()):
            maps[i] = m


def _top_k(logits: torch.Tensor) -> list[list[Prediction]]:
    probs = torch.softmax(logits.float(), dim=-1)
    scores, ids = probs.topk(min(TOP_K, probs.shape[-1]), dim=-1)
    return [
        [Prediction(class_id=int(c), score=float(s)) for c, s in zip(row_ids, row_scores)]
        for row_ids, row_scores in zip(ids.cpu().tolist(), scores.cpu().tolist())
    ]
