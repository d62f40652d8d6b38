"""Gradient Attention Rollout: class-specific rollout, weighting the attention by its gradient.

Per image and class c, for blocks l = s .. L-1: F_l = max(fuse(A_l * dy_c/dA_l), 0), y_c the
pre-softmax logit of class c; then discard, +I, rownorm, product and mask as rollout does. An
attention-pooling head's row is max(fuse(a_pool * dy_c/da_pool), 0), with no discard and no + I.
"""

from __future__ import annotations

import torch

from schemas import requests as rq
from service.engine import ops
from service.engine.contract import Captured, ModelShape, Needs
from service.methods.base import MaskMethod
from service.methods.registry import register


class GradRolloutParams(rq.Faithful):
    category_id: int = rq.below("classes", description="class to explain")
    head_fusion: rq.Fusion = rq.head_fusion("mean")
    discard_ratio: float = rq.discard_ratio("weights")
    start_layer: int = rq.start_layer()
    format: rq.PictureFormat = rq.fmt(doc="png, jpeg or webp: heatmap over the uploaded image; json: the raw map")
    max_side: int = rq.max_side()


def weights(attn: list[torch.Tensor], grads: list[torch.Tensor], fusion: rq.Fusion) -> list[torch.Tensor]:
    """Per block max(fuse(A * dy/dA), 0): (b, H, Nq, N) x2 -> (b, Nq, N)."""
    return [ops.fuse_heads(a * g, fusion).clamp_min(0.0) for a, g in zip(attn, grads)]


def explained_row(c: Captured, shape: ModelShape, fusion: rq.Fusion) -> torch.Tensor:
    """The explained row (b, N) of an autograd pass: the pooling head weighs its row like a block."""
    a = c.attn[0]
    pool = weights(c.attn[shape.layers :], c.grads[shape.layers :], fusion)[0][:, 0] if shape.pool else None
    return shape.row(a, a.shape[-1], pool)


@register
class GradRollout(MaskMethod):
    name = "grad-rollout"
    summary = "Gradient Attention Rollout for one class"
    Params = GradRolloutParams
    faithful = True  # its map can be scored (the faithfulness options)
    comparable = True  # one map: a setting of POST /compare
    per_image = ("category_id",)

    def needs(self, p: GradRolloutParams, shape: ModelShape) -> Needs:
        return Needs(grad_class=p.category_id)

    def compute(self, p: GradRolloutParams, c: Captured, shape: ModelShape) -> torch.Tensor:
        w = weights(c.attn[p.start_layer : shape.layers], c.grads[p.start_layer : shape.layers], p.head_fusion)
        return ops.rollout(w, p.discard_ratio, shape.prefix, shape.grid, explained_row(c, shape, p.head_fusion))
