"""The explained row's attention in every block: A_l[head, 0, P:] per block (or fused over heads), each
map divided by its max. The post's per-layer view of where the class token looks. A model that reads no
class token: the mean over the patch tokens' rows; with an attention-pooling head, one more map, the
head's own attention."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from schemas import requests as rq
from schemas import responses as rs
from service import imaging
from service.engine import ops
from service.engine.contract import Captured, ExplainedRow, ModelShape, Needs, Result
from service.methods.base import OnePassMethod
from service.methods.registry import register


class AttentionParams(rq.Params):
    head: Annotated[int, Field(ge=0)] | rq.Fusion = Field(
        0, description="head index (0 <= head < heads), or mean|max|min over heads",
        json_schema_extra={"x-below": "heads"},
    )
    format: rq.PictureFormat = rq.fmt(doc="png, jpeg or webp: one overlay tile per block; json: the raw maps")


def class_attention(cls_rows: list[torch.Tensor], head: int | rq.Fusion, prefix: int,
                    grid: tuple[int, int]) -> torch.Tensor:
    """Per block (b, H, N) class-token rows -> (b, L, gh, gw), each map divided by its max."""
    picked = [r[:, head] if isinstance(head, int) else ops.fuse_heads(r, head) for r in cls_rows]
    return ops.normalize_max(ops.patch_map(torch.stack(picked, dim=1), prefix, grid))


@register
class LayerAttention(OnePassMethod):
    name = "attention"
    summary = "Class-token attention in every block"
    Params = AttentionParams
    faithful = False
    comparable = False
    Response = rs.AttentionResponse

    def needs(self, p: AttentionParams, shape: ModelShape) -> Needs:
        return Needs(reduce=ExplainedRow(None if shape.pooling == "token" else shape.prefix),
                     layers=frozenset(range(shape.layers)) | shape.pool)

    def compute(self, p: AttentionParams, c: Captured, shape: ModelShape) -> torch.Tensor:
        rows = [c.reduced[b] for b in range(shape.layers)]  # per block (b, H, N)
        if shape.pool:
            rows.append(shape.tokens(c.reduced[shape.layers], rows[0].shape[-1]))
        return class_attention(rows, p.head, shape.prefix, shape.grid)

    def to_json(self, p: AttentionParams, r: Result, shape: ModelShape) -> dict[str, Any]:
        return {"model": shape.name, "params": self.echo(p), "grid": shape.grid, "layers": r.maps.tolist()}

    def draw(self, p: AttentionParams, img: Image.Image, r: Result, shape: ModelShape) -> np.ndarray:
        return imaging.montage(img, r.maps, max_side=imaging.MAX_SIDES[p.format])

    def canvas(self, p: AttentionParams) -> int | None:
        return None if p.format == "json" else imaging.TILE  # the tiles' size: the upload is never needed larger
