"""Activation maximization: the objective and its gradient against the float64 reference, the
objective rises, a seed reproduces the image, batch neighbours change nothing, regularisers work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.methods import REGISTRY, InvalidParams, job
from tests import reference as ref
from tests.conftest import smooth_image

AM = REGISTRY["activation-max"]


def ascend(engine, jobs, starts=None, steps=None):
    """Run the sessions together, step by step, as the service's background lane does -> states."""
    starts = starts or [None] * len(jobs)
    states = [j.method.start(j.params, s, engine.shape) for j, s in zip(jobs, starts)]
    for _ in range(steps or jobs[0].params.steps):
        engine.step(states, jobs)
    return states


def pixels_of(r: ref.Reference, img) -> tuple[np.ndarray, torch.Tensor]:
    """The image at the input size as the method's start takes it, uint8 (H, W, 3), and as pixel
    values (3, H, W) in [0, 1]."""
    cfg = r.model.pretrained_cfg
    x = ref.preprocess(img, r.model).double()
    x = (x * torch.tensor(cfg["std"])[:, None, None] + torch.tensor(cfg["mean"])[:, None, None]).clamp(0, 1)
    u8 = (x.permute(1, 2, 0) * 255.0).round().to(torch.uint8).numpy()
    return u8, torch.from_numpy(u8).permute(2, 0, 1).double().div(255.0).float()


TARGETS = [dict(target="class", category_id=281), dict(target="features", layer=5, channel=17),
           dict(target="q", layer=3, head=1, channel=7), dict(target="k", layer=11, head=2, channel=60)]


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t["target"])
def test_objective_and_first_step_match_the_reference(setups, target):
    engine, r, _ = setups["deit_tiny_patch16_224"]
    start8, start = pixels_of(r, smooth_image(70))
    j = job("activation-max", steps=1, lr=0.01, **target)
    (s,) = ascend(engine, [j], [start8])
    value, grad = r.unit(start, **target)
    assert s.objective[0] == pytest.approx(value, rel=1e-4, abs=1e-4)
    # Adam's first step moves every pixel by lr * sign(gradient), where not clamped.
    moved = (s.pixels - start).double()
    inside = (start > 0.02) & (start < 0.98) & (grad.abs() > grad.abs().max() * 1e-3)
    agree = (torch.sign(moved[inside]) == torch.sign(grad[inside].float())).double().mean()
    assert agree > 0.99, agree
    np.testing.assert_allclose(moved[inside].abs().numpy(), 0.01, rtol=5e-3)  # g / (|g| + eps)


@pytest.mark.slow  # minutes of steps on 2 cores: the reference check above stays in make test-fast
def test_the_objective_rises_and_pixels_stay_valid(setups):
    engine, _, _ = setups["deit_tiny_patch16_224"]
    # No jitter here: a random-weight model is far from shift-invariant, so its objective at a
    # shifted image is noise; jitter is covered by the seed test.
    rising, jittered = ascend(engine, [job("activation-max", target="class", category_id=3, steps=12),
                                       job("activation-max", target="k", layer=4, channel=2, steps=12, jitter=6,
                                           tv_weight=1.0)])
    assert len(rising.objective) == 12
    assert rising.objective[-1] > rising.objective[0] + 1.0, rising.objective
    assert all(b >= a - 0.05 for a, b in zip(rising.objective, rising.objective[1:])), rising.objective
    for s in (rising, jittered):
        assert 0.0 <= float(s.pixels.min()) and float(s.pixels.max()) <= 1.0


@pytest.mark.slow  # minutes of steps on 2 cores: the reference check above stays in make test-fast
def test_a_seed_reproduces_the_image_and_neighbours_change_nothing(setups):
    engine, _, _ = setups["deit_tiny_patch16_224"]
    a = job("activation-max", target="q", layer=2, head=0, channel=5, steps=6, seed=11, jitter=8, l2_weight=0.1)
    b = job("activation-max", target="class", category_id=9, steps=6, seed=12, tv_weight=5.0)
    c = job("activation-max", target="features", layer=1, channel=3, steps=6, seed=13)
    (alone,) = ascend(engine, [a])
    (again,) = ascend(engine, [a])
    assert torch.equal(alone.pixels, again.pixels) and alone.objective == again.objective
    together = ascend(engine, [b, a, c])[1]
    np.testing.assert_allclose(together.pixels.numpy(), alone.pixels.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(together.objective, alone.objective, rtol=1e-4, atol=1e-4)
    (other_seed,) = ascend(engine, [job("activation-max", **{**a.params.model_dump(), "seed": 99})])
    assert not torch.equal(other_seed.pixels, alone.pixels)


@pytest.mark.slow  # minutes of steps on 2 cores: the reference check above stays in make test-fast
def test_total_variation_smooths_the_image(setups):
    engine, _, _ = setups["vit_small_patch32_224"]
    from service.methods.activation_max import total_variation

    plain, smooth = ascend(engine, [job("activation-max", category_id=1, steps=8, seed=1),
                                    job("activation-max", category_id=1, steps=8, seed=1, tv_weight=50.0)])
    assert total_variation(smooth.pixels[None]) < 0.8 * total_variation(plain.pixels[None])


def test_channel_range_depends_on_the_target(setups):
    engine, _, _ = setups["deit_tiny_patch16_224"]
    AM.check(AM.Params(target="features", channel=191), engine.shape)  # embed_dim 192
    for params in (dict(target="features", channel=192), dict(target="q", channel=64), dict(layer=12)):
        with pytest.raises(InvalidParams):
            AM.check(AM.Params(**params), engine.shape)
