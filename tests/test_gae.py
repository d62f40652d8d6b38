"""GAE (Chefer et al. 2021) and start_layer against the float64 reference, alone and mixed in a batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.methods import job
from tests.conftest import ARCHS

GRAD_TOL = 1e-4  # no discard: no threshold to land on either side of


# the first architecture in make test-fast, the two others (minutes of float64 products) with the slow tests
@pytest.mark.parametrize("arch", [ARCHS[0], *(pytest.param(a, marks=pytest.mark.slow) for a in ARCHS[1:])])
def test_gae_matches_reference_at_every_start_layer(setups, arch):
    engine, r, x = setups[arch]
    cats = [7, 123, 999]
    captured = [r.run(x[i], category=c) for i, c in enumerate(cats)]
    for start in (0, 1, engine.num_layers - 1):
        jobs = [job("gae", category_id=c, start_layer=start) for c in cats]
        for i, res in enumerate(engine.run(x, jobs)):
            assert res.maps.shape == r.grid
            np.testing.assert_allclose(res.maps, r.gae(captured[i], start), atol=GRAD_TOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_start_layer_of_rollout_and_grad_rollout_matches_reference(setups, arch):
    engine, r, x = setups[arch]
    start = engine.num_layers // 2
    c = r.run(x[0], category=5)
    got = engine.run(x[[0, 0, 0]], [
        job("rollout", head_fusion="mean", discard_ratio=0.0, start_layer=start),
        job("rollout", head_fusion="max", discard_ratio=0.9, start_layer=start),
        job("grad-rollout", category_id=5, head_fusion="mean", discard_ratio=0.0, start_layer=start),
    ])
    np.testing.assert_allclose(got[0].maps, r.rollout(c, "mean", 0.0, start), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[1].maps, r.rollout(c, "max", 0.9, start), atol=3e-3, rtol=0)
    np.testing.assert_allclose(got[2].maps, r.grad_rollout(c, "mean", 0.0, start), atol=1e-4, rtol=0)
    # and it matters: starting later gives another map
    assert np.abs(got[0].maps - r.rollout(c, "mean", 0.0, 0)).max() > 1e-3


@pytest.mark.slow
def test_gae_mixed_with_every_other_method_in_one_batch(setups, models):
    """16 images, mixed methods in both passes: each answer equals its reference."""
    engine, r, _ = setups["deit_tiny_patch16_224"]
    from tests import reference as ref
    from tests.conftest import smooth_image

    m = models["deit_tiny_patch16_224"]
    x = torch.stack([ref.preprocess(smooth_image(60 + i), m) for i in range(16)])
    jobs, wants = [], []
    for i in range(16):
        kind = i % 4
        if kind == 0:
            jobs.append(job("gae", category_id=i * 50, start_layer=i % 3))
            wants.append(lambda c, i=i: r.gae(c, i % 3))
        elif kind == 1:
            jobs.append(job("grad-rollout", category_id=i * 50, head_fusion="max", discard_ratio=0.0, start_layer=1))
            wants.append(lambda c: r.grad_rollout(c, "max", 0.0, 1))
        elif kind == 2:
            jobs.append(job("rollout", head_fusion="min", discard_ratio=0.0, start_layer=i % 5))
            wants.append(lambda c, i=i: r.rollout(c, "min", 0.0, i % 5))
        else:
            jobs.append(job("attention", head="mean"))
            wants.append(lambda c: r.attention(c, "mean"))
    for i, (j, res, want) in enumerate(zip(jobs, engine.run(x, jobs), wants)):
        cat = getattr(j.params, "category_id", None)
        np.testing.assert_allclose(res.maps, want(r.run(x[i], category=cat)), atol=1e-4, rtol=0)
