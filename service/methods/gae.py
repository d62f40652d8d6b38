"""Generic Attention-model Explainability (Chefer, Gur & Wolf, ICCV 2021), for ViTs.

Per image and class c: R = I (N x N); for each block b = s .. L-1 in order:
Ā_b = mean over heads of max(dy_c/dA_b ⊙ A_b, 0); R = R + Ā_b R. The map is R[0, P:] as
gh x gw, divided by its max. No row normalisation and no discard, unlike rollout.

Only row 0 of R is needed: with R = (I + Ā_{L-1}) ... (I + Ā_s), e_0^T R is a vector times the
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


def gae_row(attn: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """Row 0 of prod_b (I + mean_h max(dA_b * A_b, 0)), blocks in order: (b, H, N, N) x2 per block -> (b, N)."""
    b, _, n, _ = attn[0].shape
    v = torch.zeros(b, n, dtype=attn[0].dtype, device=attn[0].device)
    v[:, 0] = 1.0
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
        row = gae_row(c.attn[p.start_layer :], c.grads[p.start_layer :])
        return ops.normalize_max(ops.patch_map(row, shape.prefix, shape.grid))
