"""Attention Rollout (Abnar & Zuidema 2020, as the post adapts it to ViTs).

Per image, for blocks l = s .. L-1 (s = start_layer): F_l = fuse(A_l) over heads; zero the
floor(r*N*N) smallest entries of F_l except F_l[0, 0]; Â_l = rownorm(F_l + I);
R = Â_{L-1} ... Â_s; the mask is R[0, P:] as gh x gw, divided by its max.
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
        return Needs(reduce=FuseHeads(p.head_fusion), layers=frozenset(range(p.start_layer, shape.layers)))

    def compute(self, p: RolloutParams, c: Captured, shape: ModelShape) -> torch.Tensor:
        fused = [c.reduced[b] for b in range(p.start_layer, shape.layers)]  # per block (b, N, N)
        return ops.rollout(fused, p.discard_ratio, shape.prefix, shape.grid)
