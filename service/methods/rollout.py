"""Attention Rollout (Abnar & Zuidema 2020, as the post adapts it to ViTs).

Per image, for blocks l = s .. L-1 (s = start_layer): F_l = fuse(A_l) over heads; zero the
floor(r*N*N) smallest entries of F_l except F_l[0, 0]; Â_l = rownorm(F_l + I);
R = Â_{L-1} ... Â_s; the mask is (e R)[P:] as gh x gw, divided by its max, e the explained row:
e_0 (class token), the mean over the patch tokens (avg pooling), or fuse(a_pool), the pooling head's
attention fused over heads (attention pooling: no discard, no + I).
"""

from __future__ import annotations

import torch

from schemas import requests as rq
from service.engine import ops
from service.engine.contract import Captured, FuseHeads, ModelShape, Needs
from service.methods.base import MaskMethod
from service.methods.registry import register


class RolloutParams(rq.Faithful):
    head_fusion: rq.Fusion = rq.head_fusion("max")
    discard_ratio: float = rq.discard_ratio("attentions")
    start_layer: int = rq.start_layer()
    format: rq.PictureFormat = rq.fmt(doc="png, jpeg or webp: heatmap over the uploaded image; json: the raw map")
    max_side: int = rq.max_side()


@register
class Rollout(MaskMethod):
    name = "rollout"
    summary = "Attention Rollout"
    Params = RolloutParams
    faithful = True  # its map can be scored (the faithfulness options)
    comparable = True  # one map: a setting of POST /compare

    def needs(self, p: RolloutParams, shape: ModelShape) -> Needs:
        return Needs(reduce=FuseHeads(p.head_fusion), layers=shape.explained(p.start_layer))

    def compute(self, p: RolloutParams, c: Captured, shape: ModelShape) -> torch.Tensor:
        fused = [c.reduced[b] for b in range(p.start_layer, shape.layers)]  # per block (b, N, N)
        return ops.rollout(fused, p.discard_ratio, shape.prefix, shape.grid, fused_row(c, shape, fused[0]))


def fused_row(c: Captured, shape: ModelShape, like: torch.Tensor) -> torch.Tensor:
    """The explained row (b, N) of a plain pass whose reduction fused the heads (the pooling head's: (b, 1, N'))."""
    pool = c.reduced[shape.layers][:, 0] if shape.pool else None
    return shape.row(like, like.shape[-1], pool)
