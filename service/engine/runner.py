"""Run one batch of jobs through one resident model: one forward pass, then each job's method.

The batch is split at most once: jobs that need gradients (gradient rollout) run in one pass
with autograd, all others in one pass under `torch.inference_mode`. Within a pass, every image
gets its own method and parameters; nothing about an image depends on its batch neighbours.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from service.engine import methods
from service.engine.capture import attention_from_qk, attention_modules, capture, install_hooks
from service.engine.jobs import QK, GradRollout, Job, LayerAttention, Prediction, Result, Rollout

TOP_K = 5


class Engine:
    """A model resident on one device, hooked for capture once, answering batches of jobs."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.device = device
        self.dtype = dtype
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        attns = attention_modules(self.model)
        self.scales = [a.scale for a in attns]
        self.num_layers = len(attns)
        self.num_heads = attns[0].num_heads
        self.head_dim = attns[0].head_dim
        self.prefix = int(self.model.num_prefix_tokens)
        self.grid = tuple(int(g) for g in self.model.patch_embed.grid_size)
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
        h, w = (g * p for g, p in zip(self.grid, self.model.patch_embed.patch_size))
        for b in batch_sizes:
            x = torch.zeros(b, 3, h, w)
            self.run(x, [Rollout()] * b)
            self.run(x, [GradRollout(category_id=0)] * b)

    # -- passes -----------------------------------------------------------------------------
    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory().to(self.device, non_blocking=True)
        return x.to(device=self.device, dtype=self.dtype)

    def _layers_needed(self, jobs: Sequence[Job]) -> frozenset[int]:
        if any(isinstance(j, (Rollout, LayerAttention)) for j in jobs):
            return frozenset(range(self.num_layers))
        return frozenset(j.layer for j in jobs if isinstance(j, QK))

    def _attention(self, store, layers: Sequence[int]) -> list[torch.Tensor]:
        """Recomputed post-softmax attention per block, float32, (B, H, N, N)."""
        return [attention_from_qk(store.q[l].float(), store.k[l].float(), self.scales[l]) for l in layers]

    def _run_plain(self, x: torch.Tensor, jobs: Sequence[Job]) -> list[Result]:
        layers = self._layers_needed(jobs)
        with torch.inference_mode(), capture(layers=layers) as store:
            logits = self.model(x)
            attn = self._attention(store, range(self.num_layers)) if len(layers) == self.num_layers else None
            maps = [None] * len(jobs)
            for params, idx in _group(jobs, (Rollout, LayerAttention)).items():
                sub = [a[idx] for a in attn]
                if isinstance(params, Rollout):
                    m = methods.attention_rollout(sub, params.head_fusion, params.discard_ratio, self.prefix, self.grid)
                else:
                    m = methods.class_attention(sub, params.head, self.prefix, self.grid)
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
        # and torch.autograd.grad below walks back only as far as the attention outputs.
        x = x.detach().requires_grad_(True)
        with torch.enable_grad(), capture(keep_o=True) as store:
            logits = self.model(x)
            cats = torch.tensor([j.category_id for j in jobs], device=logits.device)
            target = logits.gather(1, cats[:, None]).sum()  # images are independent: sum of own logits
            grad_o = torch.autograd.grad(target, [store.o[l] for l in layers])
        with torch.no_grad():
            attn = self._attention(store, layers)
            grads = [methods.attention_grad(g.float(), store.v[l].detach().float()) for l, g in zip(layers, grad_o)]
            maps = [None] * len(jobs)
            for params, idx in _group(jobs, (GradRollout,), ignore=("category_id",)).items():
                m = methods.grad_rollout(
                    [a[idx] for a in attn], [g[idx] for g in grads],
                    params.head_fusion, params.discard_ratio, self.prefix, self.grid,
                )
                for i, mi in zip(idx, m.cpu().numpy()):
                    maps[i] = mi
            preds = _top_k(logits.detach())
        return [Result(maps=m, predictions=p) for m, p in zip(maps, preds)]


def _group(jobs: Sequence[Job], kinds: tuple[type, ...], ignore: tuple[str, ...] = ()) -> dict[Job, list[int]]:
    """Indices of jobs of the given kinds, grouped by equal parameters (fields in `ignore` aside)."""
    groups: dict[Job, list[int]] = defaultdict(list)
    for i, j in enumerate(jobs):
        if isinstance(j, kinds):
            key = type(j)(**{**j.__dict__, **{f: 0 for f in ignore}})
            groups[key].append(i)
    return groups


def _top_k(logits: torch.Tensor) -> list[list[Prediction]]:
    probs = torch.softmax(logits.float(), dim=-1)
    scores, ids = probs.topk(min(TOP_K, probs.shape[-1]), dim=-1)
    return [
        [Prediction(class_id=int(c), score=float(s)) for c, s in zip(row_ids, row_scores)]
        for row_ids, row_scores in zip(ids.cpu().tolist(), scores.cpu().tolist())
    ]

