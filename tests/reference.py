"""An independent, dense float64 reference for every map the service returns.

Written from the definitions in the README, not from the engine: a float64 copy of the model
with timm's *unfused* attention path, the post-softmax attention read where the model applies
it (the output of `attn_drop`), gradients by autograd on those very tensors, full N x N matrix
products, and a full stable sort for the discard. Slow and simple on purpose.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from PIL import Image
from torchvision import transforms


def preprocess(img: Image.Image, model) -> torch.Tensor:
    """Squash-resize the whole image to the input size and normalise with the model's statistics."""
    cfg = model.pretrained_cfg
    h, w = cfg["input_size"][1:]
    interp = transforms.InterpolationMode(cfg.get("interpolation", "bicubic"))
    t = transforms.Compose(
        [
            transforms.Resize((h, w), interpolation=interp),
            transforms.ToTensor(),
            transforms.Normalize(cfg["mean"], cfg["std"]),
        ]
    )
    return t(img.convert("RGB"))


class Reference:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = copy.deepcopy(model).double().eval()
        self.prefix = self.model.num_prefix_tokens
        self.grid = tuple(self.model.patch_embed.grid_size)
        self._attn: list[torch.Tensor] = []
        for blk in self.model.blocks:
            blk.attn.fused_attn = False  # this private copy only
            blk.attn.attn_drop.register_forward_hook(lambda m, i, o: self._attn.append(o))
        self._q: list[torch.Tensor] = []
        self._k: list[torch.Tensor] = []
        for blk in self.model.blocks:
            blk.attn.q_norm.register_forward_hook(lambda m, i, o: self._q.append(o))
            blk.attn.k_norm.register_forward_hook(lambda m, i, o: self._k.append(o))

    def forward(self, x: torch.Tensor, grad: bool = False):
        """x (3, H, W) -> logits (C,), attention per layer (H, N, N), q and k per layer (H, N, D)."""
        self._attn.clear(); self._q.clear(); self._k.clear()
        with torch.set_grad_enabled(grad):
            xb = x[None].double()
            if grad:
                self.model.requires_grad_(True)
            logits = self.model(xb)[0]
        return logits, [a[0] for a in self._attn], [q[0] for q in self._q], [k[0] for k in self._k]

    # -- definitions --------------------------------------------------------------------------
    @staticmethod
    def fuse(x: torch.Tensor, fusion: str) -> torch.Tensor:
        return {"mean": lambda: x.mean(0), "max": lambda: x.max(0).values, "min": lambda: x.min(0).values}[fusion]()

    @staticmethod
    def discard(f: torch.Tensor, ratio: float) -> torch.Tensor:
        n = f.shape[0]
        k = math.floor(ratio * n * n)
        flat = f.flatten().clone()
        order = torch.argsort(flat, stable=True)[:k]
        order = order[order != 0]
        flat[order] = 0
        return flat.view(n, n)

    def _rollout(self, weights: list[torch.Tensor]) -> np.ndarray:
        n = weights[0].shape[0]
        eye = torch.eye(n, dtype=torch.float64)
        r = eye.clone()
        for w in weights:
            a = w + eye
            a = a / a.sum(dim=-1, keepdim=True)  # each row sums to 1
            r = a @ r  # R = Â_l ... Â_1
        row = r[0, self.prefix:].reshape(self.grid)
        return (row / row.max() if row.max() > 0 else row).numpy()

    def rollout(self, x: torch.Tensor, fusion: str = "max", ratio: float = 0.9) -> np.ndarray:
        _, attn, _, _ = self.forward(x)
        return self._rollout([self.discard(self.fuse(a, fusion), ratio) for a in attn])

    def grad_rollout(self, x: torch.Tensor, category: int, fusion: str = "mean", ratio: float = 0.9) -> np.ndarray:
        logits, _, _, _ = self.forward(x, grad=True)
        attn = list(self._attn)  # the (1, H, N, N) tensors the model multiplied with v
        for a in attn:
            a.retain_grad()
        logits[category].backward()
        weights = [self.discard(self.fuse(a.detach()[0] * a.grad[0], fusion).clamp(min=0), ratio) for a in attn]
        self.model.zero_grad(set_to_none=True)
        return self._rollout(weights)

    def attention(self, x: torch.Tensor, head) -> np.ndarray:
        _, attn, _, _ = self.forward(x)
        maps = []
        for a in attn:
            row = a[head, 0] if isinstance(head, int) else self.fuse(a[:, 0], head)
            m = row[self.prefix:].reshape(self.grid)
            maps.append((m / m.max()).numpy())
        return np.stack(maps)

    def qk(self, x: torch.Tensor, layer: int, head: int, channel: int, which: str) -> np.ndarray:
        _, _, q, k = self.forward(x)
        t = (q if which == "q" else k)[layer]
        return torch.sigmoid(t[head, self.prefix:, channel]).reshape(self.grid).numpy()

    def predictions(self, x: torch.Tensor, k: int = 5) -> list[tuple[int, float]]:
        logits, _, _, _ = self.forward(x)
        p = torch.softmax(logits, -1)
        s, i = p.topk(min(k, p.numel()))
        return list(zip(i.tolist(), s.tolist()))
