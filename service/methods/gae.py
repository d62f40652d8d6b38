"""Generic Attention-model Explainability (Chefer, Gur & Wolf, ICCV 2021), for ViTs.

Per image and class c: R = I (N x N); for each block b = s .. L-1 in order:
Ā_b = mean over heads of max(dy_c/dA_b ⊙ A_b, 0); R = R + Ā_b R. The map is (e R)[P:] as
gh x gw, divided by its max, e the explained row: e_0 (class token), the mean over the patch tokens
(avg pooling), or ā_pool = mean over heads of max(dy_c/da_pool ⊙ a_pool, 0) for an attention-pooling
head (no + I). No row normalisation and no discard, unlike rollout.

Only e R is needed: with R = (I + Ā_{L-1}) ... (I + Ā_s), e^T R is a vector times the
chain from the last block, v <- v + v Ā_b: O(L N^2), never an N x N product.
"""

from __future__ import annotations

import torch

from schemas import requests as rq
from service.engine import ops
from service.engine.contract import Captured, ModelShape, Needs
from service.methods.base import MaskMethod
from service.methods.registry import register


class GAEParams(rq.Faithful):
    category_id: int = rq.below("classes", description="class to explain")
    start_layer: int = rq.start_layer()
    format: rq.PictureFormat = rq.fmt(doc="png, jpeg or webp: heatmap over the uploaded image; json: the raw map")
    max_side: int = rq.max_side()


def gae_row(attn: list[torch.Tensor], grads: list[torch.Tensor], e: torch.Tensor | None = None) -> torch.Tensor:
    """e^T prod_b (I + mean_h max(dA_b * A_b, 0)), blocks in order: (b, H, N, N) x2 per block -> (b, N);
    e (b, N) the explained row (None: row 0)."""
    b, _, n, _ = attn[0].shape
    if e is None:
        v = torch.zeros(b, n, dtype=attn[0].dtype, device=attn[0].device)
        v[:, 0] = 1.0
    else:
        v = e.to(attn[0].dtype)
    for a, g in zip(reversed(attn), reversed(grads)):
        abar = (a * g).clamp_min(0.0).mean(dim=1)  # (b, N, N)
        v = v + torch.bmm(v.unsqueeze(1), abar).squeeze(1)
    return v


@register
class GAE(MaskMethod):
    name = "gae"
    summary = "Generic Attention-model Explainability (Chefer et al. 2021) for one class"
    Params = GAEParams
    faithful = True  # its map can be scored (the faithfulness options)
    comparable = True  # one map: a setting of POST /compare
    per_image = ("category_id",)

    def needs(self, p: GAEParams, shape: ModelShape) -> Needs:
        return Needs(grad_class=p.category_id)

    def compute(self, p: GAEParams, c: Captured, shape: ModelShape) -> torch.Tensor:
        a = c.attn[0]
        pool = None
        if shape.pool:  # the pooling head's row, weighed like a block's, with no + I
            pool = (c.attn[shape.layers] * c.grads[shape.layers]).clamp_min(0.0).mean(dim=1)[:, 0]
        e = shape.row(a, a.shape[-1], pool)
        row = gae_row(c.attn[p.start_layer : shape.layers], c.grads[p.start_layer : shape.layers], e)
        return ops.normalize_max(ops.patch_map(row, shape.prefix, shape.grid))
