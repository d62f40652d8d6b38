"""Attention Rollout (Abnar & Zuidema 2020, as the post adapts it to ViTs).

Per image, for blocks l = s .. L-1 (s = start_layer): F_l = fuse(A_l) over heads; zero the
floor(r*N*N) smallest entries of F_l except F_l[0, 0]; Â_l = rownorm(F_l + I);
R = Â_{L-1} ... Â_s; the mask is (e R)[P:] as gh x gw, divided by its max, e the explained row:
e_0 (class token), the mean over the patch tokens (avg pooling), or fuse(a_pool), the pooling head's
attention fused over heads (attention pooling: no discard, no + I).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from schemas import requests as rq
from schemas import responses as rs
from service import imaging
from service.engine import ops
from service.engine.contract import Captured, FuseHeads, ModelShape, Needs, Result
from service.methods.base import OnePassMethod, predictions
from service.methods.registry import register


class RolloutParams(rq.Faithful):
    head_fusion: rq.Fusion = rq.head_fusion("max")
    discard_ratio: float = rq.discard_ratio("attentions")
    start_layer: int = rq.start_layer()
    format: rq.PictureFormat = rq.fmt(doc="png, jpeg or webp: heatmap over the uploaded image; json: the raw map")
    max_side: int = rq.max_side()


class MaskMethod(OnePassMethod):
    """A method whose answer is one mask over the patches: JSON `mask`, PNG heatmap over the image."""

    Response = rs.MaskResponse
    faithful = True
    comparable = True

    def to_json(self, p: rq.Params, r: Result, shape: ModelShape) -> dict[str, Any]:
        out = {"model": shape.name, "method": self.name, "params": self.echo(p), "grid": shape.grid,
               "mask": r.maps.tolist(), "predictions": predictions(r, shape)}
        if r.faithfulness:
            out["faithfulness"] = r.faithfulness[0].to_json()
        return out

    def draw(self, p: rq.Params, img: Image.Image, r: Result, shape: ModelShape) -> np.ndarray:
        return imaging.overlay(img, r.maps)


@register
class Rollout(MaskMethod):
    name = "rollout"
    summary = "Attention Rollout"
    Params = RolloutParams

    def needs(self, p: RolloutParams, shape: ModelShape) -> Needs:
        return Needs(reduce=FuseHeads(p.head_fusion), layers=shape.explained(p.start_layer))

    def compute(self, p: RolloutParams, c: Captured, shape: ModelShape) -> torch.Tensor:
        fused = [c.reduced[b] for b in range(p.start_layer, shape.layers)]  # per block (b, N, N)
        return ops.rollout(fused, p.discard_ratio, shape.prefix, shape.grid, fused_row(c, shape, fused[0]))


def fused_row(c: Captured, shape: ModelShape, like: torch.Tensor) -> torch.Tensor:
    """The explained row (b, N) of a plain pass whose reduction fused the heads (the pooling head's: (b, 1, N'))."""
    pool = c.reduced[shape.layers][:, 0] if shape.pool else None
    return shape.row(like, like.shape[-1], pool)
