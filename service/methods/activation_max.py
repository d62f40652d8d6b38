"""Activation maximization (the post's last section): the input that maximises one unit.

The unit (`target`):

    class      the logit of `category_id`
    features   channel `channel` of block `layer`'s output, averaged over the patch tokens
    mlp        hidden unit `channel` of block `layer`'s MLP before its activation (the output of
               the first MLP layer, fc1), averaged over the patch tokens: its gradient does not
               vanish where the unit is off, as the GELU's output's does (Ghiasi et al. 2022 find
               these units the interpretable ones of a ViT)
    q | k      channel `channel` of head `head` of block `layer`'s q or k, averaged over the patches

How the picture is made (`param`):

    fourier    (the default) the picture is a phase-only Fourier image in decorrelated colour
               (service/methods/parametrization.py: a fixed natural 1/f^1.5 magnitude, MACO);
               each step averages the objective over `copies` random transforms of it
               (service/methods/transforms.py: shift, scale, rotation with reflected borders,
               colour gain and offset, optional noise annealed to 0), all in one forward and
               backward pass, and takes one Adam step on the phases.
    pixel      the post's recipe, pixel for pixel as before: `steps` times, shift the image by a
               random (dy, dx) of up to `jitter` pixels (torch.roll) and take one Adam step up the
               gradient with respect to the pixels x in [0, 1], clamped after each step.

Both ascend objective - l2_weight * mean(((x - mean) / std)^2) - tv_weight * TV(x), with x the
model's input picture (each copy) and TV(x) the mean of squared differences between vertically and
horizontally neighbouring pixels. After the last step one more pass (the last progress event)
measures the answer's `robustness`:

    robustness = (mean objective of the picture under 16 held-out transforms - b) / (objective - b)

with the held-out transforms drawn from a fixed seed (shift up to 16 px, scale 0.85-1.15, rotation
up to 10 degrees, reflected borders; transforms.HELD_OUT) and b the objective of the picture the
ascent started from (noise, or the upload), so that no data set is needed: 1 means the unit keeps
all it gained when the picture moves, 0 that it keeps none of it (an adversarial pattern). None
when the ascent gained nothing. `final_objective` is the finished picture's objective,
`start_objective` is b.

Every image has its own parameters, seed (its transforms and starting picture) and optimizer
state: its result does not depend on its batch neighbours. `objective` in the answer is the
unit's value at every step, before that step's update (for `fourier`, the mean over the copies).
"""

from __future__ import annotations

import base64
import math
import struct
import zlib
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
from service.methods import transforms as tf
from service.methods.base import InvalidParams, LongMethod
from service.methods.parametrization import PARAMETRIZATIONS
from service.methods.registry import register

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
FOURIER = "phase"  # the Fourier parametrisation of param=fourier (PARAMETRIZATIONS; docs/feature-visualization.md)
# the copies' random transforms under param=fourier (measured: docs/feature-visualization.md)
TRAIN = tf.Ranges(shift=16, scale=0.1, degrees=10, gain=0.1, offset=0.1)
MAX_PASSES = 4096  # steps x copies: the forward and backward passes one request may ask for
EVAL_ROWS = tf.HELD_OUT_COPIES + 2  # the robustness pass: the start, the answer, its held-out copies


class ActivationMaxParams(rq.Params):
    target: Literal["class", "features", "mlp", "q", "k"] = Field("class", description="the unit to maximise")
    category_id: int = rq.below("classes", 0, "class whose logit is maximised (target=class)",
                                when={"target": ["class"]})
    layer: int = rq.below("layers", 0, "block (target=features, mlp, q or k)",
                          when={"target": ["features", "mlp", "q", "k"]})
    head: int = rq.below("heads", 0, "head (target=q or k)", when={"target": ["q", "k"]})
    channel: int = Field(0, ge=0, description="channel: < embed_dim for features, < the MLP's hidden width "
                                              "(4 x embed_dim) for mlp, < head_dim for q and k",
                         json_schema_extra=rq.applies({"target": ["features", "mlp", "q", "k"]}))
    param: Literal["fourier", "pixel"] = Field(
        "fourier", description="fourier: a phase-only 1/f^1.5 Fourier image in decorrelated colour, ascended "
                               "over random transforms; pixel: the pixels themselves (the post's recipe)")
    copies: int = Field(4, ge=1, le=16, description="randomly transformed copies averaged per step",
                        json_schema_extra=rq.applies({"param": ["fourier"]}))
    noise: float = Field(0.0, ge=0.0, le=1.0, description="std of the noise added to each copy, annealed to 0",
                         json_schema_extra=rq.applies({"param": ["fourier"]}))
    steps: int = Field(64, ge=1, le=1000, description="gradient ascent steps")
    lr: float = Field(0.05, gt=0.0, le=1.0,
                      description="Adam step size: in pixel values (0..1) for pixel, in radians of phase for fourier")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the starting picture and the transforms")
    l2_weight: float = Field(0.0, ge=0.0, le=1e4, description="weight of the L2 decay of the normalised image")
    jitter: int = Field(0, ge=0, le=64, description="random shift of up to this many pixels each step",
                        json_schema_extra=rq.applies({"param": ["pixel"]}))
    tv_weight: float = Field(0.0, ge=0.0, le=1e6,
                             description="weight of the total variation between neighbouring pixels")
    format: rq.Format = rq.fmt(doc="png: the image at the model's input size (its robustness and objective "
                                   "in tEXt chunks); json: the image as base64 PNG (the same chunks), the "
                                   "objective per step, robustness, final_objective, start_objective")


@dataclass
class Ascent:
    """One image's optimisation: its picture (pixels, or a Fourier image drawing them), Adam
    moments, random generator, history and, once measured, its robustness."""

    pixels: torch.Tensor  # (3, H, W) float32 in [0, 1], CPU: the picture (param=fourier: as last drawn)
    generator: torch.Generator
    picture: Any = None  # param=fourier: the Fourier image (parametrization.PhaseImage or LucidImage)
    m: torch.Tensor = None  # type: ignore[assignment]
    v: torch.Tensor = None  # type: ignore[assignment]
    shift: tuple[int, int] = (0, 0)
    objective: list[float] = field(default_factory=list)
    start: torch.Tensor = None  # type: ignore[assignment]  # (3, H, W) the starting picture
    made: torch.Tensor | None = None  # (c, 3, H, W) this step's copies, with their graph to the phases
    measured: bool = False
    start_objective: float | None = None
    final_objective: float | None = None
    robustness: float | None = None

    def __post_init__(self) -> None:
        leaf = self.pixels if self.picture is None else self.picture.param
        self.m = torch.zeros_like(leaf, requires_grad=False)
        self.v = torch.zeros_like(leaf, requires_grad=False)
        self.start = self.pixels.clone()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """(b, 3, H, W) -> (b,): mean squared difference of vertical plus of horizontal neighbours."""
    dv = (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).mean(dim=(1, 2, 3))
    dh = (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).mean(dim=(1, 2, 3))
    return dv + dh


def robustness(start: float, final: float, held_out: list[float]) -> float | None:
    """(mean(held_out) - start) / (final - start); None when the ascent gained nothing."""
    gain = final - start
    if not (math.isfinite(gain) and gain > 1e-6 * max(1.0, abs(start))):
        return None
    value = (sum(held_out) / len(held_out) - start) / gain
    return value if math.isfinite(value) else None


def _adam(param: torch.Tensor, m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, t: int, lr: float) -> None:
    """One Adam step *up* the gradient g at step t (1-based), in place."""
    b1, b2 = ADAM_BETAS
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    step = lr / (1 - b1**t)
    denom = (v / (1 - b2**t)).sqrt_().add_(ADAM_EPS)
    param.addcdiv_(m, denom, value=step)


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
            limit, dim = {"features": (shape.embed_dim, "embed_dim"), "mlp": (shape.mlp_dim, "MLP hidden units")}.get(
                p.target, (shape.head_dim, "head_dim"))
            if p.channel >= limit:
                raise InvalidParams("channel", f"must be < {limit} for target={p.target} "
                                               f"(model {shape.name!r} has {dim} {limit})")
        if p.param == "fourier" and p.steps * p.copies > MAX_PASSES:
            raise InvalidParams("copies", f"steps x copies must be <= {MAX_PASSES} (asked {p.steps} x {p.copies})")

    def needs(self, p: ActivationMaxParams, shape: ModelShape) -> Needs:
        if p.target == "features":
            return Needs(features=frozenset({p.layer}))
        if p.target == "mlp":
            return Needs(mlp=frozenset({p.layer}))
        if p.target in ("q", "k"):
            return Needs(qk=frozenset({p.layer}))
        return Needs()

    def frames(self, p: ActivationMaxParams) -> int:
        """Pictures at the input size the work makes (the pixel budget): a step's copies (one picture
        for param=pixel) and the robustness pass's."""
        return (p.copies if p.param == "fourier" else 1) + EVAL_ROWS

    # -- the optimisation, per image -------------------------------------------------------------
    def steps(self, p: ActivationMaxParams) -> int:
        return p.steps + 1  # the ascent, then the robustness pass

    def start(self, p: ActivationMaxParams, pixels: np.ndarray | None, shape: ModelShape) -> Ascent:
        """Start from the upload (uint8 (H, W, 3) at the input size), or from seeded noise when None
        (param=fourier: random phases; with an upload, its phases)."""
        g = torch.Generator().manual_seed(p.seed)
        h, w = shape.input_size
        if p.param == "fourier":
            picture = PARAMETRIZATIONS[FOURIER](h, w, g)
            if pixels is not None:
                picture.set_pixels(ops.unit_pixels(pixels))
            with torch.no_grad():
                return Ascent(pixels=picture.image(), generator=g, picture=picture)
        if pixels is None:
            start = (0.5 + 0.1 * torch.randn(3, h, w, generator=g)).clamp_(0.0, 1.0)
        else:
            start = ops.unit_pixels(pixels)  # (3, H, W) in [0, 1]
        return Ascent(pixels=start.float().clone(), generator=g)

    def shifted(self, p: ActivationMaxParams, s: Ascent) -> torch.Tensor:
        """This step's input: the robustness pass after the last step (EVAL_ROWS rows: the start,
        the picture, its held-out copies); else param=fourier's copies (copies, 3, H, W); else the
        image rolled by a fresh random shift of up to `jitter` pixels (3, H, W)."""
        if len(s.objective) >= p.steps:
            return torch.cat([s.start[None], s.pixels[None], tf.held_out(s.pixels)])
        if p.param == "fourier":
            with torch.enable_grad():
                image = s.picture.image()  # (3, H, W), differentiable w.r.t. the phases
                t = tf.random_transforms(p.copies, TRAIN, s.generator)
                sigma = p.noise * (1 - len(s.objective) / p.steps)
                s.made = tf.apply(image, t, sigma, s.generator)  # (copies, 3, H, W)
            s.pixels = image.detach()
            return s.made.detach()
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
        elif p.target == "mlp":
            value = c.mlp[p.layer][:, shape.prefix :, p.channel].mean(dim=1)  # (b, N, hidden) -> (b,)
        else:
            t = (c.q if p.target == "q" else c.k)[p.layer]  # (b, H, N, D)
            value = t[:, p.head, shape.prefix :, p.channel].mean(dim=1)
        penalty = torch.zeros_like(value)
        if p.l2_weight:
            penalty = penalty + p.l2_weight * shape.normalize(x).pow(2).mean(dim=(1, 2, 3))
        if p.tv_weight:
            penalty = penalty + p.tv_weight * total_variation(x)
        return value, penalty

    def update(self, p: ActivationMaxParams, s: Ascent, grad: torch.Tensor, value: Any) -> float | None:
        """One Adam step up `grad`: at the shifted image, shifted back and clamped to [0, 1]
        (pixel); through the copies' transforms to the phases (fourier). After the last step,
        the robustness pass's values: -> the picture's objective."""
        if len(s.objective) >= p.steps:
            if not s.measured:
                s.start_objective, s.final_objective = value[0], value[1]
                s.robustness = robustness(value[0], value[1], value[2:])
                s.measured = True
            return s.final_objective
        if p.param == "fourier":
            # the mean over the copies: each copy's gradient / copies, back through the transforms
            (g,) = torch.autograd.grad(s.made, s.picture.param, grad_outputs=grad / len(grad))
            s.made = None
            s.objective.append(sum(value) / len(value))
            with torch.no_grad():
                _adam(s.picture.param, s.m, s.v, g, len(s.objective), p.lr)
                s.pixels = s.picture.image()
            return None
        dy, dx = s.shift
        g = torch.roll(grad, (-dy, -dx), dims=(1, 2)) if (dy or dx) else grad
        s.objective.append(value)
        _adam(s.pixels, s.m, s.v, g, len(s.objective), p.lr)
        s.pixels.clamp_(0.0, 1.0)
        return None

    # -- answers ---------------------------------------------------------------------------------
    def result(self, p: ActivationMaxParams, s: Ascent) -> Result:
        arr = (s.pixels.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)  # (H, W, 3)
        return Result(maps=arr, predictions=[], objective=list(s.objective),
                      extra={"robustness": s.robustness, "final_objective": s.final_objective,
                             "start_objective": s.start_objective})

    def to_json(self, p: ActivationMaxParams, r: Result, shape: ModelShape) -> dict[str, Any]:
        extra = r.extra or {}
        return {"model": shape.name, "params": self.echo(p),
                "image": base64.b64encode(_png_with_text(imaging.encode_png(r.maps), _texts(r))).decode(),
                "objective": [v if math.isfinite(v) else None for v in r.objective or []],
                **{k: _finite(extra.get(k)) for k in ("robustness", "final_objective", "start_objective")}}

    def draw(self, p: ActivationMaxParams, img: Image.Image | None, r: Result, shape: ModelShape) -> np.ndarray:
        return r.maps

    def render(self, p: ActivationMaxParams, img: Image.Image | None, r: Result,
               shape: ModelShape) -> tuple[bytes, str]:
        """The PNG, with the robustness figures in tEXt chunks (keys robustness, objective, start_objective)."""
        body, media = super().render(p, img, r, shape)
        return _png_with_text(body, _texts(r)), media


def _texts(r: Result) -> dict[str, str]:
    """The PNG's tEXt chunks: robustness, objective (the finished picture's) and start_objective."""
    extra = r.extra or {}
    text = {"robustness": extra.get("robustness"), "objective": extra.get("final_objective"),
            "start_objective": extra.get("start_objective")}
    return {k: "none" if v is None else f"{v:.6g}" for k, v in text.items()}


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _png_with_text(png: bytes, text: dict[str, str]) -> bytes:
    """The PNG with a tEXt chunk (keyword NUL text, Latin-1) per entry, right after its IHDR chunk."""
    ihdr_end = 8 + 4 + 4 + 13 + 4  # signature, then IHDR: length, type, 13 bytes of data, CRC
    chunks = b""
    for key, value in text.items():
        data = key.encode("latin-1") + b"\0" + value.encode("latin-1")
        chunks += struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    return png[:ihdr_end] + chunks + png[ihdr_end:]
