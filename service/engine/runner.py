"""Run one batch of jobs through one resident model: one forward pass, then each job's method.

The batch is split at most once: jobs that need gradients (gradient rollout) run in one pass
with autograd, all others in one pass under `torch.inference_mode`. Within a pass, every image
gets its own method and parameters; nothing about an image depends on its batch neighbours.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import nn

from service.engine import methods
from service.engine.capture import attention_modules, capture, install_hooks
from service.engine.jobs import QK, GradRollout, Job, LayerAttention, Prediction, Result, Rollout

TOP_K = 5


class Engine:
    """A model resident on one device, hooked for capture once, answering batches of jobs."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.device = device
        self.dtype = dtype
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        attns = attention_modules(self.model)
        self.num_layers = len(attns)
        self.num_heads = attns[0].num_heads
        self.head_dim = attns[0].head_dim
        self.prefix = int(self.model.num_prefix_tokens)
        self.grid = tuple(int(g) for g in self.model.patch_embed.grid_size)
        # (H, W) the model takes. Not grid x patch: a hybrid ViT's conv stem shrinks the image before its
        # patch projection (vit_tiny_r_s16_p8_224: 224 -> 56 px features -> 8 px patches -> 7 x 7 grid).
        img_size = getattr(self.model.patch_embed, "img_size", None)
        if img_size is None:  # dynamic-size embeddings record none; their patches tile the input
            img_size = [g * p for g, p in zip(self.grid, self.model.patch_embed.patch_size)]
        self.input_size = tuple(int(s) for s in img_size)
        self._hooks = install_hooks(self.model)

    # -- public -----------------------------------------------------------------------------
    def run(self, images: torch.Tensor, jobs: Sequence[Job]) -> list[Result]:
        """images (B, 3, H, W) float32, preprocessed, on any device; jobs[i] is image i's request."""
        if images.shape[0] != len(jobs):
            raise ValueError(f"{images.shape[0]} images for {len(jobs)} jobs")
        results: list[Result | None] = [None] * len(jobs)
        grad_idx = [i for i, j in enumerate(jobs) if isinstance(j, GradRollout)]
        plain_idx = [i for i, j in enumerate(jobs) if not isinstance(j, GradRollout)]
        for idx, runner in ((plain_idx, self._run_plain), (grad_idx, self._run_grad)):
            if idx:
                x = self._to_device(images[idx] if len(idx) < len(jobs) else images)
                for i, r in zip(idx, runner(x, [jobs[i] for i in idx])):
                    results[i] = r
        return results  # type: ignore[return-value]

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run every method once so the first real request does not pay for lazy initialisation."""
        h, w = self.input_size
        for b in batch_sizes:
            x = torch.zeros(b, 3, h, w)
            self.run(x, [Rollout()] * b)
            self.run(x, [GradRollout(category_id=0)] * b)

    # -- passes -----------------------------------------------------------------------------
    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory().to(self.device, non_blocking=True)
        return x.to(device=self.device, dtype=self.dtype)

    def _run_plain(self, x: torch.Tensor, jobs: Sequence[Job]) -> list[Result]:
        every = frozenset(range(self.num_layers))
        attn_layers = every if any(isinstance(j, (Rollout, LayerAttention)) for j in jobs) else frozenset()
        qk_layers = frozenset(j.layer for j in jobs if isinstance(j, QK))
        reduced = _Reduced(jobs)
        with torch.inference_mode(), capture(attn_layers, qk_layers, take=reduced) as store:
            logits = self.model(x)
            maps = [None] * len(jobs)
            for params, idx in _group(jobs, (Rollout, LayerAttention)).items():
                if isinstance(params, Rollout):
                    fused = reduced.blocks(reduced.fused, idx)  # per block (b, N, N)
                    m = methods.rollout(fused, params.discard_ratio, self.prefix, self.grid)
                else:
                    cls_rows = reduced.blocks(reduced.cls_rows, idx)  # per block (b, H, N)
                    m = methods.class_attention(cls_rows, params.head, self.prefix, self.grid)
                for i, mi in zip(idx, m.cpu().numpy()):
                    maps[i] = mi
            for i, job in enumerate(jobs):
                if isinstance(job, QK):
                    t = (store.q if job.which == "q" else store.k)[job.layer][i : i + 1].float()
                    maps[i] = methods.qk_image(t, job.head, job.channel, self.prefix, self.grid)[0].cpu().numpy()
            preds = _top_k(logits)
        return [Result(maps=m, predictions=p) for m, p in zip(maps, preds)]

    def _run_grad(self, x: torch.Tensor, jobs: Sequence[GradRollout]) -> list[Result]:
        layers = range(self.num_layers)
        # The image requires grad only so that autograd records a graph: the weights never do,
        # and torch.autograd.grad below walks back only as far as the attention tensors.
        x = x.detach().requires_grad_(True)
        with torch.enable_grad(), capture(attn_layers=frozenset(layers)) as store:
            logits = self.model(x)
            cats = torch.tensor([j.category_id for j in jobs], device=logits.device)
            target = logits.gather(1, cats[:, None]).sum()  # images are independent: sum of own logits
            attn = [store.attn[l] for l in layers]
            grads = torch.autograd.grad(target, attn)  # per block dy/dA (B, H, N, N)
        with torch.no_grad():
            attn = [a.detach().float() for a in attn]
            grads = [g.float() for g in grads]
            maps = [None] * len(jobs)
            for params, idx in _group(jobs, (GradRollout,), ignore=("category_id",)).items():
                m = methods.grad_rollout(
                    _rows(attn, idx, len(jobs)), _rows(grads, idx, len(jobs)),
                    params.head_fusion, params.discard_ratio, self.prefix, self.grid,
                )
                for i, mi in zip(idx, m.cpu().numpy()):
                    maps[i] = mi
            preds = _top_k(logits.detach())
        return [Result(maps=m, predictions=p) for m, p in zip(maps, preds)]


class _Reduced:
    """What the plain pass keeps of each block's attention, reduced as it is made (capture's `take`).

    Per block, for the rows of rollout jobs, the heads fused as each job asks, F_l (B, N, N); for
    the rows of layer-attention jobs, the class token's row A_l[:, :, 0, :] (B, H, N). Rows of other
    jobs are left unset and never read. Runs of equal jobs in a chunk are reduced together.
    """

    def __init__(self, jobs: Sequence[Job]) -> None:
        self.jobs = jobs
        self.fused: dict[int, torch.Tensor] = {}
        self.cls_rows: dict[int, torch.Tensor] = {}

    def __call__(self, block: int, rows: slice, attn: torch.Tensor) -> None:
        for start, stop, job in _runs(self.jobs, rows):
            a = attn[start - rows.start : stop - rows.start].float()  # (b, H, N, N)
            if isinstance(job, Rollout):  # fused straight into the block's buffer: no temporary
                methods.fuse_heads(a, job.head_fusion, out=self._buffer(self.fused, block, a[:, 0])[start:stop])
            elif isinstance(job, LayerAttention):
                self._buffer(self.cls_rows, block, a[:, :, 0])[start:stop] = a[:, :, 0]

    def _buffer(self, store: dict[int, torch.Tensor], block: int, like: torch.Tensor) -> torch.Tensor:
        if block not in store:
            store[block] = like.new_empty(len(self.jobs), *like.shape[1:])
        return store[block]

    def blocks(self, store: dict[int, torch.Tensor], idx: list[int]) -> list[torch.Tensor]:
        """The rows idx of every block's buffer, in block order."""
        return _rows([store[b] for b in sorted(store)], idx, len(self.jobs))


def _runs(jobs: Sequence[Job], rows: slice) -> list[tuple[int, int, Job]]:
    """(start, stop, job) for each run of equal consecutive jobs within rows."""
    out: list[tuple[int, int, Job]] = []
    for i in range(rows.start, rows.stop):
        if out and out[-1][2] == jobs[i]:
            out[-1] = (out[-1][0], i + 1, jobs[i])
        else:
            out.append((i, i + 1, jobs[i]))
    return out


def _group(jobs: Sequence[Job], kinds: tuple[type, ...], ignore: tuple[str, ...] = ()) -> dict[Job, list[int]]:
    """Indices of jobs of the given kinds, grouped by equal parameters (fields in `ignore` aside)."""
    groups: dict[Job, list[int]] = defaultdict(list)
    for i, j in enumerate(jobs):
        if isinstance(j, kinds):
            key = type(j)(**{**j.__dict__, **{f: 0 for f in ignore}})
            groups[key].append(i)
    return groups


def _rows(tensors: list[torch.Tensor], idx: list[int], batch: int) -> list[torch.Tensor]:
    """The batch rows idx of every tensor; no copy when that is the whole batch."""
    return tensors if len(idx) == batch else [t[idx] for t in tensors]


def _top_k(logits: torch.Tensor) -> list[list[Prediction]]:
    probs = torch.softmax(logits.float(), dim=-1)
    scores, ids = probs.topk(min(TOP_K, probs.shape[-1]), dim=-1)
    return [
        [Prediction(class_id=int(c), score=float(s)) for c, s in zip(row_ids, row_scores)]
        for row_ids, row_scores in zip(ids.cpu().tolist(), scores.cpu().tolist())
    ]

