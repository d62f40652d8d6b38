"""Q and K feature images: sigmoid of one channel of one head of q or k (after the block's q/k
norm, before scaling) over the patch tokens. The post's view of how information flows."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from schemas import requests as rq
from schemas import responses as rs
from service import imaging
from service.engine import ops
from service.engine.contract import Captured, ModelShape, Needs, Result
from service.methods.base import OnePassMethod
from service.methods.registry import register


class QKParams(rq.Params):
    layer: int = rq.below("layers", 0, "block index")
    head: int = rq.below("heads", 0, "head index")
    channel: int = rq.below("head_dim", 0, "channel of the head")
    which: Literal["q", "k"] = Field("q", description="q (queries) or k (keys)")
    format: rq.Format = rq.fmt(doc="png: grayscale feature image at the upload's size (up to max_side); "
                                   "json: the raw map")
    max_side: int = rq.max_side()


@register
class QK(OnePassMethod):
    name = "qk"
    summary = "Q or K feature image of one channel"
    Params = QKParams
    faithful = False
    comparable = False
    Response = rs.QKResponse

    def needs(self, p: QKParams, shape: ModelShape) -> Needs:
        return Needs(qk=frozenset({p.layer}))

    def compute(self, p: QKParams, c: Captured, shape: ModelShape) -> torch.Tensor:
        t = (c.q if p.which == "q" else c.k)[p.layer].float()  # (b, H, N, D)
        return torch.sigmoid(ops.patch_map(t[:, p.head, :, p.channel], shape.prefix, shape.grid))

    def to_json(self, p: QKParams, r: Result, shape: ModelShape) -> dict[str, Any]:
        return {"model": shape.name, "params": self.echo(p), "grid": shape.grid, "map": r.maps.tolist()}

    def draw(self, p: QKParams, img: Image.Image, r: Result, shape: ModelShape) -> np.ndarray:
        return imaging.grayscale(r.maps, img.size)
