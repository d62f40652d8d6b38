"""Random transforms of a picture, differentiable, for feature visualization and its robustness.

A transform maps a picture x (3, H, W) to x'(u) = a * x(A u + t) + c (per channel), sampled
bilinearly, with reflected borders, where u is an output pixel's position about the centre, A is a
rotation by theta times a scale 1/s (the content grows by s), t a shift in pixels, a and c a colour
gain and offset per channel; optional Gaussian noise is added after. `random_transforms` draws them
from a generator, `apply` makes the copies (c, 3, H, W) in one grid_sample, keeping the graph back
to x.

The ascent of activation maximization averages the objective over such copies; its robustness
figure re-measures the finished picture under HELD_OUT transforms it was not optimised for
(drawn from a fixed seed): shifts up to 16 px, scales 0.85-1.15, rotations up to 10 degrees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Ranges:
    """Uniform ranges of the random transforms: |shift| <= shift px (each axis), scale in [1 - scale,
    1 + scale], |rotation| <= degrees, colour gain in [1 - gain, 1 + gain], offset |c| <= offset."""

    shift: float = 0.0
    scale: float = 0.0
    degrees: float = 0.0
    gain: float = 0.0
    offset: float = 0.0


HELD_OUT = Ranges(shift=16, scale=0.15, degrees=10)  # the robustness figure's transforms
HELD_OUT_COPIES = 16
HELD_OUT_SEED = 20231209


@dataclass(frozen=True)
class Transforms:
    """n transforms: shift (n, 2) px (dy, dx), scale (n,), theta (n,) radians, gain (n, 3), offset (n, 3)."""

    shift: torch.Tensor
    scale: torch.Tensor
    theta: torch.Tensor
    gain: torch.Tensor
    offset: torch.Tensor

    @staticmethod
    def identity(n: int) -> Transforms:
        return Transforms(torch.zeros(n, 2), torch.ones(n), torch.zeros(n), torch.ones(n, 3), torch.zeros(n, 3))


def random_transforms(n: int, r: Ranges, generator: torch.Generator) -> Transforms:
    """n transforms drawn uniformly from the ranges (always the same number of draws, so a seed
    gives the same transforms whatever the ranges)."""

    def uniform(*shape: int) -> torch.Tensor:
        return 2 * torch.rand(*shape, generator=generator) - 1  # in [-1, 1)

    shift, scale, theta, gain, offset = uniform(n, 2), uniform(n), uniform(n), uniform(n, 3), uniform(n, 3)
    return Transforms(shift=shift * r.shift, scale=1 + scale * r.scale, theta=theta * math.radians(r.degrees),
                      gain=1 + gain * r.gain, offset=offset * r.offset)


def apply(x: torch.Tensor, t: Transforms, noise: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """x (3, H, W) -> (n, 3, H, W): the content scaled by s about the centre, rotated by theta and
    moved by shift (output pixel u, about the centre, reads x at R(theta) u / s - shift); borders
    reflected; then a * . + c per channel, plus N(0, noise^2) per value when noise > 0."""
    _, h, w = x.shape
    n = t.scale.shape[0]
    cos, sin = torch.cos(t.theta) / t.scale, torch.sin(t.theta) / t.scale
    # affine_grid works in normalised coordinates (-1..1 across each axis, align_corners=False):
    # pixel offsets scale by 2/W (x) and 2/H (y); the rotation mixes axes of different lengths.
    theta = torch.zeros(n, 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * h / w
    theta[:, 1, 0] = sin * w / h
    theta[:, 1, 1] = cos
    theta[:, 0, 2] = -2 * t.shift[:, 1].to(x.dtype) / w
    theta[:, 1, 2] = -2 * t.shift[:, 0].to(x.dtype) / h
    grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
    out = F.grid_sample(x.expand(n, -1, -1, -1), grid, mode="bilinear", padding_mode="reflection",
                        align_corners=False)  # (n, 3, H, W)
    out = out * t.gain.to(x.dtype)[:, :, None, None] + t.offset.to(x.dtype)[:, :, None, None]
    if noise > 0:
        out = out + noise * torch.randn(out.shape, generator=generator, dtype=out.dtype)
    return out


def held_out(x: torch.Tensor) -> torch.Tensor:
    """x (3, H, W) -> (HELD_OUT_COPIES, 3, H, W): the robustness figure's transforms, the same for every call."""
    g = torch.Generator().manual_seed(HELD_OUT_SEED)
    return apply(x, random_transforms(HELD_OUT_COPIES, HELD_OUT, g))
