"""The Fourier image, the colour decorrelation and the random transforms of activation maximization,
against their definitions (service/methods/parametrization.py, service/methods/transforms.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from service.methods import parametrization as pz
from service.methods import transforms as tf

H, W = 24, 32  # not square, even width: the rfft's last column is its own mirror


def test_frequencies_are_the_distance_from_dc_in_cycles_per_pixel():
    f = pz.frequencies(H, W).numpy()
    assert f.shape == (H, W // 2 + 1)
    for y, x in ((0, 0), (1, 0), (0, 1), (5, 3), (H - 1, W // 2), (H // 2, 7)):
        fy = (y if y < (H + 1) // 2 else y - H) / H  # numpy's fftfreq, written out
        fx = x / W
        assert f[y, x] == pytest.approx(math.hypot(fy, fx))
    s = pz.spectrum_scale(H, W, 1.5).numpy()
    assert s[0, 0] == pytest.approx(W**1.5)  # finite at DC: 1 / (1 / max(H, W))^1.5
    assert s[3, 4] == pytest.approx(math.hypot(3 / H, 4 / W) ** -1.5)


def test_colour_decorrelation_is_lucids_matrix_and_round_trips():
    q = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
    c = q / np.linalg.norm(q, axis=0).max()
    np.testing.assert_allclose(pz.COLOR.numpy(), c, rtol=1e-12)
    y = torch.randn(2, 3, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rgb = pz.decorrelated_to_rgb(y)
    np.testing.assert_allclose(rgb[1, :, 4, 5].numpy(), c @ y[1, :, 4, 5].numpy(), rtol=1e-12)
    np.testing.assert_allclose(pz.rgb_to_decorrelated(rgb).numpy(), y.numpy(), atol=1e-12)
    # white decorrelated noise gives RGB with covariance C C^T: the channels correlated as in photos
    white = torch.randn(3, 400, 400, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cov = np.cov(pz.decorrelated_to_rgb(white).reshape(3, -1).numpy())
    np.testing.assert_allclose(cov, c @ c.T, atol=0.01)


def test_the_phase_image_has_the_stated_spectrum():
    img = pz.PhaseImage(H, W, torch.Generator().manual_seed(3))
    y = img.decorrelated().detach().double()  # (3, H, W)
    spectrum = torch.fft.rfft2(y, norm="ortho")
    m = pz.spectrum_scale(H, W, pz.PHASE_DECAY)
    k = img.magnitude.double()[1, 1] / m[1, 1]
    # columns 1 .. W/2 - 1 are not their own mirror: irfft2 keeps them as they are
    inner = (slice(None), slice(None), slice(1, W // 2))
    np.testing.assert_allclose(spectrum.abs()[inner].numpy(), (k * m).expand(3, -1, -1)[inner].numpy(), rtol=1e-4)
    np.testing.assert_allclose(torch.angle(spectrum)[inner].numpy(),
                               torch.angle(torch.polar(torch.ones(()), img.param.detach()))[inner].numpy(),
                               atol=1e-3)
    assert abs(float(y.mean())) < 1e-6  # no DC
    assert float(y.std()) == pytest.approx(pz.PHASE_CONTRAST, rel=0.15)  # by Parseval, up to the mirrored columns
    pixels = img.image().detach()
    assert pixels.shape == (3, H, W) and 0 < float(pixels.min()) and float(pixels.max()) < 1
    np.testing.assert_allclose(pixels.numpy(), torch.sigmoid(pz.decorrelated_to_rgb(y)).float().numpy(), atol=1e-6)


def test_a_phase_image_round_trips_through_its_pixels():
    a = pz.PhaseImage(H, W, torch.Generator().manual_seed(4))
    b = pz.PhaseImage(H, W, torch.Generator().manual_seed(5))
    b.set_pixels(a.image().detach())
    # the phases of the columns that are not their own mirror come back (mod 2 pi); irfft2 mixes the
    # others' with their mirrors', so that is all a picture of them holds
    inner = (slice(None), slice(None), slice(1, W // 2))
    turn = torch.remainder(b.param.detach() - a.param.detach() + math.pi, 2 * math.pi) - math.pi
    assert float(turn[inner].abs().max()) < 1e-2


def test_the_lucid_image_is_scaled_by_one_over_f_and_round_trips():
    img = pz.LucidImage(H, W, torch.Generator().manual_seed(6))
    y = img.decorrelated().detach().double()
    spectrum = torch.fft.rfft2(y, norm="ortho")
    want = torch.view_as_complex(img.param.detach().double()) / pz.frequencies(H, W).clamp(min=1 / W) / 4
    inner = (slice(None), slice(None), slice(1, W // 2))
    np.testing.assert_allclose(spectrum[inner].numpy(), want[inner].numpy(), rtol=1e-4, atol=1e-7)
    pixels = torch.rand(3, H, W, generator=torch.Generator().manual_seed(7)) * 0.9 + 0.05
    img.set_pixels(pixels)
    np.testing.assert_allclose(img.image().detach().numpy(), pixels.numpy(), atol=1e-4)


def square(n: int = 32) -> torch.Tensor:
    """(3, n, n) a smooth picture with distinct channels."""
    yy, xx = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")
    return torch.stack([torch.sin(xx / 5) * torch.cos(yy / 7), xx / n, (yy / n) ** 2])


def test_the_identity_transform_changes_nothing():
    x = square()
    np.testing.assert_allclose(tf.apply(x, tf.Transforms.identity(2))[1].numpy(), x.numpy(), atol=1e-12)


def test_a_whole_pixel_shift_moves_the_content():
    x = square()
    t = tf.Transforms.identity(1)
    t = tf.Transforms(torch.tensor([[3.0, -2.0]]), t.scale, t.theta, t.gain, t.offset)
    out = tf.apply(x, t)[0]
    # content moved down 3 and left 2: out[y, x] = x[y - 3, x + 2] where both are inside
    np.testing.assert_allclose(out[:, 3:, :-2].numpy(), x[:, :-3, 2:].numpy(), atol=1e-12)
    # the borders are reflected, not zero
    np.testing.assert_allclose(out[:, 0, :-2].numpy(), x[:, 2, 2:].numpy(), atol=1e-12)


def test_a_quarter_turn_and_a_zoom_about_the_centre():
    x = square()
    ident = tf.Transforms.identity(2)
    t = tf.Transforms(ident.shift, torch.tensor([1.0, 2.0]), torch.tensor([math.pi / 2, 0.0]), ident.gain, ident.offset)
    turned, zoomed = tf.apply(x, t)
    # a quarter turn of a square picture: out[i, j] = x[j, n - 1 - i] (theta in float32: cos is -4e-8)
    np.testing.assert_allclose(turned.numpy(), torch.rot90(x, k=1, dims=(1, 2)).numpy(), atol=1e-5)
    # zoom 2: output pixel u (about the centre 15.5) reads the input at 15.5 + (u - 15.5) / 2
    for u in (10, 15, 16, 21):
        src = 15.5 + (u - 15.5) / 2
        lo = math.floor(src)
        want = x[:, lo, lo] * (1 - (src - lo)) ** 2 + x[:, lo + 1, lo + 1] * (src - lo) ** 2 \
            + (x[:, lo, lo + 1] + x[:, lo + 1, lo]) * (src - lo) * (1 - (src - lo))
        np.testing.assert_allclose(zoomed[:, u, u].numpy(), want.numpy(), atol=1e-9)


def bilinear(x: torch.Tensor, row: float, col: float) -> torch.Tensor:
    r0, c0 = math.floor(row), math.floor(col)
    fr, fc = row - r0, col - c0
    return (x[:, r0, c0] * (1 - fr) * (1 - fc) + x[:, r0, c0 + 1] * (1 - fr) * fc
            + x[:, r0 + 1, c0] * fr * (1 - fc) + x[:, r0 + 1, c0 + 1] * fr * fc)


def test_shift_scale_and_turn_together_on_a_picture_that_is_not_square():
    """Output pixel u (row, col about the centre, in pixels) reads the input at R(theta) u / s - shift."""
    yy, xx = torch.meshgrid(torch.arange(40, dtype=torch.float64), torch.arange(64, dtype=torch.float64),
                            indexing="ij")
    x = torch.stack([torch.sin(xx / 5) * torch.cos(yy / 7), xx / 64, (yy / 40) ** 2])  # (3, 40, 64)
    theta, scale, dy, dx = 0.3, 1.25, 2.5, -4.0
    ident = tf.Transforms.identity(1)
    t = tf.Transforms(torch.tensor([[dy, dx]]), torch.tensor([scale]), torch.tensor([theta]), ident.gain, ident.offset)
    out = tf.apply(x, t)[0]
    cy, cx = 19.5, 31.5
    for row, col in ((20, 30), (15, 40), (25, 22), (18, 33)):
        uy, ux = row - cy, col - cx
        sx = (math.cos(theta) * ux - math.sin(theta) * uy) / scale - dx
        sy = (math.sin(theta) * ux + math.cos(theta) * uy) / scale - dy
        np.testing.assert_allclose(out[:, row, col].numpy(), bilinear(x, cy + sy, cx + sx).numpy(), atol=1e-5)


def test_colour_gain_offset_and_noise():
    x = square()
    ident = tf.Transforms.identity(1)
    gain, offset = torch.tensor([[0.9, 1.0, 1.1]]), torch.tensor([[0.05, -0.1, 0.0]])
    out = tf.apply(x, tf.Transforms(ident.shift, ident.scale, ident.theta, gain, offset))[0]
    want = x * gain[0, :, None, None].double() + offset[0, :, None, None].double()
    np.testing.assert_allclose(out.numpy(), want.numpy(), atol=1e-7)
    noisy = tf.apply(x, tf.Transforms.identity(64), noise=0.2, generator=torch.Generator().manual_seed(0))
    assert float((noisy - x).std()) == pytest.approx(0.2, rel=0.05)


def test_random_transforms_keep_to_their_ranges_and_the_held_out_ones_are_fixed():
    r = tf.Ranges(shift=5, scale=0.2, degrees=30, gain=0.1, offset=0.3)
    t = tf.random_transforms(500, r, torch.Generator().manual_seed(1))
    assert float(t.shift.abs().max()) <= 5 and float(t.shift.abs().max()) > 4.5
    assert 0.8 <= float(t.scale.min()) and float(t.scale.max()) <= 1.2
    assert float(t.theta.abs().max()) <= math.radians(30) + 1e-9
    assert float((t.gain - 1).abs().max()) <= 0.1 and float(t.offset.abs().max()) <= 0.3
    x = square(64).float()
    a, b = tf.held_out(x), tf.held_out(x)
    assert a.shape == (16, 3, 64, 64) and torch.equal(a, b)
    held = tf.random_transforms(16, tf.HELD_OUT, torch.Generator().manual_seed(tf.HELD_OUT_SEED))
    assert float(held.shift.abs().max()) <= 16 and float((held.scale - 1).abs().max()) <= 0.15
    assert float(held.theta.abs().max()) <= math.radians(10) + 1e-9
    assert torch.equal(held.gain, torch.ones(16, 3)) and torch.equal(held.offset, torch.zeros(16, 3))


def test_the_transforms_carry_the_gradient_back_to_the_picture():
    x = square(16).requires_grad_(True)
    t = tf.random_transforms(3, tf.Ranges(shift=3, scale=0.1, degrees=10, gain=0.1), torch.Generator().manual_seed(2))
    assert torch.autograd.gradcheck(lambda v: tf.apply(v, t), (x,), eps=1e-6, atol=1e-5)
