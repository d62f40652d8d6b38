"""How a feature picture is parametrised: an image made of Fourier coefficients in decorrelated colour.

Gradient ascent on raw pixels finds high-frequency patterns that drive a unit (adversarial noise).
Ascending the parameters of an image made from a natural spectrum instead keeps the picture's power
where photographs have theirs (Olah et al., "Feature Visualization", Distill 2017; Lucid's
`fft_image` and `to_valid_rgb`; Fel et al., "Unlocking Feature Visualization for Deeper Networks
with MAgnitude Constrained Optimization", NeurIPS 2023). Two parametrisations, both

    pixels = sigmoid(C y)      (3, H, W) in (0, 1): y in decorrelated colour, C mixes it to RGB

where y (3, H, W) is, per decorrelated channel c, the inverse real 2-D DFT (orthonormal) of

    lucid   Y_c(f) = s(f) S_c(f) / 4,   s(f) = 1 / max(|f|, 1 / max(H, W))         S learned, complex
    phase   Y_c(f) = k M(f) exp(i phi_c(f)),   M(f) = 1 / max(|f|, 1 / max(H, W))^1.5, M(0) = 0
                                                                              phi learned, real

with |f| = sqrt(fy^2 + fx^2) in cycles per pixel (fy from fftfreq(H), fx from rfftfreq(W)). Lucid's
1/f scale only preconditions the ascent: S itself can grow any spectrum. The phase-only
parametrisation fixes the magnitude to a natural 1/f^1.5 falloff (no mean: DC = 0) and lets the
ascent choose only the phases, i.e. where the structure is; k scales y to a standard deviation of
PHASE_CONTRAST (by Parseval, the sum of y^2 over the pixels is the sum of |Y|^2 over the full
spectrum, whatever the phases).

Colour decorrelation (Lucid): C = Q / max_j ||Q[:, j]||, with Q the square root of the colour
correlation of ImageNet photos (from its SVD). White y (independent channels of equal variance)
then gives RGB values with covariance proportional to C C^T, correlated across channels as in
photographs, so a step in y moves luminance and the colour-opponent directions evenly.
"""

from __future__ import annotations

import math

import torch

# Lucid's square root of ImageNet's colour correlation (rows R, G, B; columns the decorrelated channels)
COLOR_CORRELATION_SVD_SQRT = torch.tensor([[0.26, 0.09, 0.02],
                                           [0.27, 0.00, -0.05],
                                           [0.27, -0.09, 0.03]], dtype=torch.float64)
COLOR = COLOR_CORRELATION_SVD_SQRT / COLOR_CORRELATION_SVD_SQRT.norm(dim=0).max()  # C: columns of norm <= 1
PHASE_DECAY = 1.5  # M(f) = 1 / f^1.5
PHASE_CONTRAST = 1.5  # std of y, the decorrelated image before the colour mix and the sigmoid
LUCID_INIT_STD = 0.01  # Lucid's starting coefficients: N(0, 0.01^2)


def frequencies(h: int, w: int) -> torch.Tensor:
    """(h, w // 2 + 1) float64: |f| in cycles per pixel of each coefficient of an rfft2 of an (h, w) image."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
    return (fy * fy + fx * fx).sqrt()


def spectrum_scale(h: int, w: int, decay: float) -> torch.Tensor:
    """(h, w // 2 + 1) float64: 1 / max(|f|, 1 / max(h, w))^decay, the 1/f^decay falloff, finite at DC."""
    return 1.0 / frequencies(h, w).clamp(min=1.0 / max(h, w)) ** decay


def _hermitian_weights(h: int, w: int) -> torch.Tensor:
    """(h, w // 2 + 1): how many coefficients of the full 2-D spectrum each rfft2 coefficient stands for
    (1 for the columns fx = 0 and, for even w, fx = 1/2, which are their own mirror; 2 otherwise)."""
    weights = torch.full((h, w // 2 + 1), 2.0, dtype=torch.float64)
    weights[:, 0] = 1.0
    if w % 2 == 0:
        weights[:, -1] = 1.0
    return weights


def decorrelated_to_rgb(y: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) decorrelated colour -> (..., 3, H, W) RGB before the sigmoid: C y per pixel."""
    return torch.einsum("rc,...chw->...rhw", COLOR.to(y.dtype), y)


def rgb_to_decorrelated(rgb: torch.Tensor) -> torch.Tensor:
    """The inverse of `decorrelated_to_rgb`: C^-1 rgb per pixel."""
    return torch.einsum("cr,...rhw->...chw", torch.linalg.inv(COLOR).to(rgb.dtype), rgb)


def _logit(pixels: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    p = pixels.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


class LucidImage:
    """Lucid's fft_image: learned complex coefficients S (3, H, W//2+1), stored as real pairs (..., 2)."""

    def __init__(self, h: int, w: int, generator: torch.Generator) -> None:
        self.size = (h, w)
        self.scale = spectrum_scale(h, w, 1.0).float()  # s(f), (H, W//2+1)
        self.param = (LUCID_INIT_STD * torch.randn(3, h, w // 2 + 1, 2, generator=generator)).requires_grad_(True)

    def decorrelated(self) -> torch.Tensor:
        """y (3, H, W), differentiable w.r.t. the coefficients."""
        spectrum = torch.view_as_complex(self.param) * self.scale / 4.0
        return torch.fft.irfft2(spectrum, s=self.size, norm="ortho")

    def image(self) -> torch.Tensor:
        """(3, H, W) pixel values in (0, 1)."""
        return torch.sigmoid(decorrelated_to_rgb(self.decorrelated()))

    def set_pixels(self, pixels: torch.Tensor) -> None:
        """Make the coefficients draw these pixels (3, H, W) in [0, 1] (clamped to [1e-3, 1 - 1e-3])."""
        y = rgb_to_decorrelated(_logit(pixels.float()))
        spectrum = torch.fft.rfft2(y, norm="ortho") * 4.0 / self.scale
        with torch.no_grad():
            self.param.copy_(torch.view_as_real(spectrum))


class PhaseImage:
    """MACO's phase-only image: the magnitude fixed to k M(f), the phases phi (3, H, W//2+1) learned."""

    def __init__(self, h: int, w: int, generator: torch.Generator) -> None:
        self.size = (h, w)
        magnitude = spectrum_scale(h, w, PHASE_DECAY)
        magnitude[0, 0] = 0.0  # no mean: the picture's mean colour is the sigmoid's midpoint
        # Parseval (orthonormal DFT): sum over pixels of y^2 = sum over the full spectrum of |Y|^2
        power = (_hermitian_weights(h, w) * magnitude**2).sum() / (h * w)  # mean of y^2 per pixel
        self.magnitude = (magnitude * PHASE_CONTRAST / power.sqrt()).float()  # k M(f), (H, W//2+1)
        self.param = (2 * math.pi * torch.rand(3, h, w // 2 + 1, generator=generator) - math.pi).requires_grad_(True)

    def decorrelated(self) -> torch.Tensor:
        """y (3, H, W), differentiable w.r.t. the phases."""
        spectrum = torch.polar(self.magnitude.expand_as(self.param), self.param)
        return torch.fft.irfft2(spectrum, s=self.size, norm="ortho")

    def image(self) -> torch.Tensor:
        return torch.sigmoid(decorrelated_to_rgb(self.decorrelated()))

    def set_pixels(self, pixels: torch.Tensor) -> None:
        """Take the phases of these pixels (3, H, W) in [0, 1]: the picture keeps their layout, not
        their spectrum's magnitude."""
        y = rgb_to_decorrelated(_logit(pixels.float()))
        with torch.no_grad():
            self.param.copy_(torch.fft.rfft2(y, norm="ortho").angle())


PARAMETRIZATIONS = {"lucid": LucidImage, "phase": PhaseImage}
