"""Activation maximization (the post's last section): the input that maximises one unit.

Per image, starting from noise (or the uploaded image), `steps` times: shift the image by a
random (dy, dx) of up to `jitter` pixels (torch.roll), and take one Adam step up the gradient of

    objective - l2_weight * mean(((x - mean) / std)^2) - tv_weight * TV(x)

with respect to the pixels x in [0, 1] (clamped to that range after each step), where the
objective is the unit's value:

    class      the logit of `category_id`
    features   channel `channel` of block `layer`'s output, averaged over the patch tokens
    q | k      channel `channel` of head `head` of block `layer`'s q or k, averaged over the patches

and TV(x) = mean of squared differences between vertically and horizontally neighbouring pixels,
which the post suggests against the 14 x 14 patch discontinuities it shows. The normalised
image's L2 pulls towards the model's mean colour. Every image has its own parameters, seed and
optimizer state: its result does not depend on its batch neighbours. `objective` in the answer
is the unit's value at every step, before that step's update.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
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
from service.methods.base import InvalidParams, LongMethod
from service.methods.registry import register

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class ActivationMaxParams(rq.Params):
    target: Literal["class", "features", "q", "k"] = Field("class", description="the unit to maximise")
    category_id: int = rq.below("classes", 0, "class whose logit is maximised (target=class)",
                                when={"target": ["class"]})
    layer: int = rq.below("layers", 0, "block (target=features, q or k)", when={"target": ["features", "q", "k"]})
    head: int = rq.below("heads", 0, "head (target=q or k)", when={"target": ["q", "k"]})
    channel: int = Field(0, ge=0, description="channel: < embed_dim for features, < head_dim for q and k")
    steps: int = Field(100, ge=1, le=1000, description="gradient ascent steps")
    lr: float = Field(0.05, gt=0.0, le=1.0, description="Adam step size, in pixel values (0..1)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the starting noise and the jitter")
    l2_weight: float = Field(0.0, ge=0.0, le=1e4, description="weight of the L2 decay of the normalised image")
    jitter: int = Field(0, ge=0, le=64, description="random shift of up to this many pixels each step")
    tv_weight: float = Field(0.0, ge=0.0, le=1e6,
                             description="weight of the total variation between neighbouring pixels")
    format: rq.Format = rq.fmt(doc="png: the image at the model's input size; "
                                   "json: the image as base64 PNG and the objective per step")


@dataclass
class Ascent:
    """One image's optimisation: its pixels, Adam moments, random generator and history."""

    pixels: torch.Tensor  # (3, H, W) float32 in [0, 1], CPU
    generator: torch.Generator
    m: torch.Tensor = None  # type: ignore[assignment]
    v: torch.Tensor = None  # type: ignore[assignment]
    shift: tuple[int, int] = (0, 0)
    objective: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.m = torch.zeros_like(self.pixels)
        self.v = torch.zeros_like(self.pixels)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """(b, 3, H, W) -> (b,): mean squared difference of vertical plus of horizontal neighbours."""
    dv = (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).mean(dim=(1, 2, 3))
    dh = (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).mean(dim=(1, 2, 3))
    return dv + dh


@register
class ActivationMax(LongMethod):
    name = "activation-max"
    summary = "The input that maximises a unit (activation maximization); text/event-stream for progress"
    Params = ActivationMaxParams
    faithful = False
    comparable = False
    Response = rs.ActivationMaxResponse

    def check(self, p: ActivationMaxParams, shape: ModelShape) -> None:
        super().check(p, shape)
        if p.target != "class":
            limit, dim = (shape.embed_dim, "embed_dim") if p.target == "features" else (shape.head_dim, "head_dim")
            if p.channel >= limit:
                raise InvalidParams("channel", f"must be < {limit} for target={p.target} "
                                               f"(model {shape.name!r} has {dim} {limit})")

    def needs(self, p: ActivationMaxParams, shape: ModelShape) -> Needs:
        if p.target == "features":
            return Needs(features=frozenset({p.layer}))
        if p.target in ("q", "k"):
            return Needs(qk=frozenset({p.layer}))
        return Needs()

    # -- the optimisation, per image -------------------------------------------------------------
    def steps(self, p: ActivationMaxParams) -> int:
        return p.steps

    def start(self, p: ActivationMaxParams, pixels: np.ndarray | None, shape: ModelShape) -> Ascent:
        """Start from the upload (uint8 (H, W, 3) at the input size), or from seeded noise when None."""
        g = torch.Generator().manual_seed(p.seed)
        if pixels is None:
            h, w = shape.input_size
            start = (0.5 + 0.1 * torch.randn(3, h, w, generator=g)).clamp_(0.0, 1.0)
        else:
            start = ops.unit_pixels(pixels)  # (3, H, W) in [0, 1]
        return Ascent(pixels=start.float().clone(), generator=g)

    def shifted(self, p: ActivationMaxParams, s: Ascent) -> torch.Tensor:
        """This step's input: the image rolled by a fresh random shift of up to `jitter` pixels."""
        if p.jitter == 0:
            s.shift = (0, 0)
            return s.pixels
        dy, dx = torch.randint(-p.jitter, p.jitter + 1, (2,), generator=s.generator).tolist()
        s.shift = (dy, dx)
        return torch.roll(s.pixels, (dy, dx), dims=(1, 2))

    def objective(self, p: ActivationMaxParams, c: Captured, x: torch.Tensor, shape: ModelShape):
        """-> (the unit's value (b,), the regularisers' penalty (b,)) for a group of equal parameters."""
        if p.target == "class":
            value = c.logits[:, p.category_id]
        elif p.target == "features":
            value = c.features[p.layer][:, shape.prefix :, p.channel].mean(dim=1)
        else:
            t = (c.q if p.target == "q" else c.k)[p.layer]  # (b, H, N, D)
            value = t[:, p.head, shape.prefix :, p.channel].mean(dim=1)
        penalty = torch.zeros_like(value)
        if p.l2_weight:
            penalty = penalty + p.l2_weight * shape.normalize(x).pow(2).mean(dim=(1, 2, 3))
        if p.tv_weight:
            penalty = penalty + p.tv_weight * total_variation(x)
        return value, penalty

    def update(self, p: ActivationMaxParams, s: Ascent, grad: torch.Tensor, value: float) -> None:
        """One Adam step up `grad` (the gradient at the shifted image, shifted back), clamped to [0, 1]."""
        dy, dx = s.shift
        g = torch.roll(grad, (-dy, -dx), dims=(1, 2)) if (dy or dx) else grad
        b1, b2 = ADAM_BETAS
        s.objective.append(value)
        t = len(s.objective)
        s.m.mul_(b1).add_(g, alpha=1 - b1)
        s.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        step = p.lr / (1 - b1**t)
        denom = (s.v / (1 - b2**t)).sqrt_().add_(ADAM_EPS)
        s.pixels.addcdiv_(s.m, denom, value=step).clamp_(0.0, 1.0)

    # -- answers ---------------------------------------------------------------------------------
    def result(self, p: ActivationMaxParams, s: Ascent) -> Result:
        arr = (s.pixels.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)  # (H, W, 3)
        return Result(maps=arr, predictions=[], objective=list(s.objective))

    def to_json(self, p: ActivationMaxParams, r: Result, shape: ModelShape) -> dict[str, Any]:
        return {"model": shape.name, "params": self.echo(p),
                "image": base64.b64encode(imaging.encode_png(r.maps)).decode(),
                "objective": [v if math.isfinite(v) else None for v in r.objective or []]}

    def draw(self, p: ActivationMaxParams, img: Image.Image | None, r: Result, shape: ModelShape) -> np.ndarray:
        return r.maps
