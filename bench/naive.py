"""BASELINE, not the service: attention rollout written the way the blog post's code works.

Kept only so the benchmark can say how much the engine gains over it. What it does, as the
post's code does: a private copy of the model with *unfused* attention so that forward hooks on
`attn_drop` see the post-softmax attention; one image at a time; a dense N x N product over
the layers (result = a @ result); the discard by a full top-k selection over all N*N entries.
Max head fusion, discard 0.9. Unlike the post, rows are normalised (a / a.sum(-1, keepdim)),
so that its maps agree with the engine's and the comparison is between equal answers.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn


class NaiveRollout:
    def __init__(self, model: nn.Module, head_fusion: str = "max", discard_ratio: float = 0.9) -> None:
        self.model = copy.deepcopy(model).eval()
        self.head_fusion = head_fusion
        self.discard_ratio = discard_ratio
        self.attentions: list[torch.Tensor] = []
        for blk in self.model.blocks:
            blk.attn.fused_attn = False  # the post's hooks never fire with fused attention
            blk.attn.attn_drop.register_forward_hook(self._keep)

    def _keep(self, _mod, _inp, out: torch.Tensor) -> None:
        self.attentions.append(out.cpu())

    def __call__(self, images: torch.Tensor) -> list[np.ndarray]:
        """One mask per image, each from its own forward pass."""
        masks = []
        for i in range(images.shape[0]):
            self.attentions = []
            with torch.no_grad():
                self.model(images[i : i + 1])
            masks.append(self._rollout())
        return masks

    def _rollout(self) -> np.ndarray:
        n = self.attentions[0].size(-1)
        result = torch.eye(n)
        with torch.no_grad():
            for attention in self.attentions:
                if self.head_fusion == "mean":
                    fused = attention.mean(dim=1)
                elif self.head_fusion == "max":
                    fused = attention.max(dim=1)[0]
                else:
                    fused = attention.min(dim=1)[0]
                flat = fused.view(fused.size(0), -1)
                _, indices = flat.topk(int(flat.size(-1) * self.discard_ratio), -1, False)
                indices = indices[indices != 0]
                flat[0, indices] = 0
                a = (fused + torch.eye(n)) / 2
                a = a / a.sum(dim=-1, keepdim=True)  # rows (the post divides columns)
                result = a @ result
        mask = result[0, 0, 1:]
        width = int(mask.size(-1) ** 0.5)
        mask = mask.reshape(width, width).numpy()
        return mask / np.max(mask)
