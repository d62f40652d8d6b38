"""The discard sweep (the post's animation): rollout or gradient rollout at many discard ratios.

One forward pass (and, for gradient rollout, one backward pass) per image; every ratio's mask is
computed from the same captured weights F_l, exactly as one request at that ratio would compute
it. Answers: an animated GIF or APNG, one labelled heatmap frame per ratio, or JSON with one mask
per ratio.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pydantic import Field, field_validator

from schemas import requests as rq
from schemas import responses as rs
from service import budget, imaging
from service.engine import ops
from service.engine.contract import Captured, FuseHeads, ModelShape, Needs, Result
from service.methods import grad_rollout, rollout
from service.methods.base import OnePassMethod, predictions
from service.methods.registry import register

DEFAULT_RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99)
MAX_RATIOS = 64

SweepFormat = Literal["gif", "apng", "json"]


def _ratios(v: Any) -> Any:
    """A form field sends the ratios comma-separated: "0,0.5,0.9"; counted before it is split."""
    if isinstance(v, str):
        if v.count(",") >= MAX_RATIOS:
            raise ValueError(f"more than {MAX_RATIOS} ratios")
        return [t.strip() for t in v.split(",") if t.strip()]
    return v


class _SweepFields(rq.Faithful):
    discard_ratios: tuple[float, ...] = Field(
        DEFAULT_RATIOS, min_length=1, max_length=MAX_RATIOS,
        description="discard ratios, each 0 <= r < 1, in frame order: a JSON list or a comma-separated form field",
        json_schema_extra=rq.role("frames"),
    )
    frame_ms: int = Field(500, ge=20, le=10_000, description="duration of each frame of the animation, in ms",
                          json_schema_extra=rq.role("frame-ms"))
    max_side: int = rq.max_side()
    format: SweepFormat = Field("gif", description="gif or apng: animated heatmaps labelled with their ratio; "
                                                   "json: one mask per ratio (always json for several images)")

    _split = field_validator("discard_ratios", mode="before")(_ratios)

    @field_validator("discard_ratios")
    @classmethod
    def _in_range(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        bad = [r for r in v if not 0.0 <= r < 1.0]
        if bad:
            raise ValueError(f"every ratio must be 0 <= r < 1, not {bad[0]!r}")
        return v


class RolloutSweepParams(_SweepFields):
    head_fusion: rq.Fusion = rq.head_fusion("max")
    start_layer: int = rq.start_layer()


class GradRolloutSweepParams(_SweepFields):
    category_id: int = rq.below("classes", description="class to explain")
    head_fusion: rq.Fusion = rq.head_fusion("mean")
    start_layer: int = rq.start_layer()


def sweep(weights: list[torch.Tensor], ratios: tuple[float, ...], prefix: int, grid: tuple[int, int],
          e: torch.Tensor) -> torch.Tensor:
    """Rollout masks at every ratio from the same per-block weights (b, N, N) and explained row e (b, N)
    -> (b, R, gh, gw)."""
    return torch.stack([ops.rollout([w.clone() for w in weights], r, prefix, grid, e) for r in ratios], dim=1)


class _Sweep(OnePassMethod):
    Response = rs.SweepResponse
    of: str  # the method swept

    def to_json(self, p: _SweepFields, r: Result, shape: ModelShape) -> dict[str, Any]:
        out = {"model": shape.name, "method": self.of, "params": self.echo(p), "grid": shape.grid,
               "discard_ratios": list(p.discard_ratios), "masks": r.maps.tolist(), "predictions": predictions(r, shape)}
        if r.faithfulness:
            out["faithfulness"] = [c.to_json() for c in r.faithfulness]  # one per ratio, in order
        return out

    def render(self, p: _SweepFields, img: Image.Image, r: Result, shape: ModelShape) -> tuple[bytes, str]:
        frames = []
        for m, ratio in zip(r.maps, p.discard_ratios):
            budget.check_deadline("drawing the animation")
            frame = _label(imaging.overlay(img, m), f"discard {ratio:.2f}")
            frames.append(imaging.to_palette(frame) if p.format == "gif" else frame)
        buf = imaging.DeadlineBuffer()  # the encode stops at the request's deadline too
        fmt = "GIF" if p.format == "gif" else "PNG"
        frames[0].save(buf, format=fmt, save_all=True, append_images=_Checked(frames[1:]), duration=p.frame_ms,
                       loop=0)
        return buf.getvalue(), imaging.MEDIA_TYPES[p.format]

    def frames(self, p: _SweepFields) -> int:
        return len(p.discard_ratios)


class _Checked(list):
    """The frames as PIL's encoders walk them (each of their passes over the frames computes a
    difference per frame before anything is written): a deadline check before every frame."""

    def __iter__(self):
        for frame in super().__iter__():
            budget.check_deadline("encoding the animation")
            yield frame


def _label(arr: np.ndarray, text: str) -> Image.Image:
    """The frame with its label in a dark box at the top left."""
    img = Image.fromarray(arr)
    size = max(10, min(img.size) // 14)
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = draw.textbbox((size // 3, size // 4), text, font=font)
    pad = max(1, size // 6)
    draw.rectangle((x0 - pad, y0 - pad, x1 + pad, y1 + pad), fill=(0, 0, 0))
    draw.text((size // 3, size // 4), text, fill=(255, 255, 255), font=font)
    return img


@register
class RolloutSweep(_Sweep):
    name = "rollout-sweep"
    path = "/rollout/sweep"
    summary = "Attention Rollout at many discard ratios, from one forward pass"
    Params = RolloutSweepParams
    faithful = True  # every frame's map is scored
    comparable = False  # many maps
    of = "rollout"

    def needs(self, p: RolloutSweepParams, shape: ModelShape) -> Needs:
        return Needs(reduce=FuseHeads(p.head_fusion), layers=shape.explained(p.start_layer))

    def compute(self, p: RolloutSweepParams, c: Captured, shape: ModelShape) -> torch.Tensor:
        fused = [c.reduced[b] for b in range(p.start_layer, shape.layers)]
        return sweep(fused, p.discard_ratios, shape.prefix, shape.grid, rollout.fused_row(c, shape, fused[0]))


@register
class GradRolloutSweep(_Sweep):
    name = "grad-rollout-sweep"
    path = "/grad-rollout/sweep"
    summary = "Gradient Attention Rollout for one class at many discard ratios, from one pass"
    Params = GradRolloutSweepParams
    faithful = True  # every frame's map is scored
    comparable = False  # many maps
    per_image = ("category_id",)
    of = "grad-rollout"

    def needs(self, p: GradRolloutSweepParams, shape: ModelShape) -> Needs:
        return Needs(grad_class=p.category_id)

    def compute(self, p: GradRolloutSweepParams, c: Captured, shape: ModelShape) -> torch.Tensor:
        w = grad_rollout.weights(c.attn[p.start_layer : shape.layers], c.grads[p.start_layer : shape.layers],
                                 p.head_fusion)
        e = grad_rollout.explained_row(c, shape, p.head_fusion)
        return sweep(w, p.discard_ratios, shape.prefix, shape.grid, e)
