"""The discard sweep: every frame equals one rollout at that ratio, from one pass; the animation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from service.methods import REGISTRY, job
from tests.conftest import smooth_image

RATIOS = (0.0, 0.3, 0.6, 0.9, 0.99)


@pytest.mark.parametrize("arch", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_sweep_masks_equal_single_requests_and_the_reference(setups, arch):
    engine, r, x = setups[arch]
    sweeps = [job("rollout-sweep", discard_ratios=RATIOS, head_fusion="max", start_layer=1),
              job("grad-rollout-sweep", category_id=17, discard_ratios=RATIOS, head_fusion="mean")]
    singles = [job("rollout", discard_ratio=q, head_fusion="max", start_layer=1) for q in RATIOS]
    singles += [job("grad-rollout", category_id=17, discard_ratio=q, head_fusion="mean") for q in RATIOS]
    got = engine.run(x[[0, 0]], sweeps)
    one_by_one = engine.run(x[[0] * len(singles)], singles)
    assert got[0].maps.shape == (len(RATIOS), *r.grid)
    np.testing.assert_allclose(got[0].maps, np.stack([s.maps for s in one_by_one[: len(RATIOS)]]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(got[1].maps, np.stack([s.maps for s in one_by_one[len(RATIOS) :]]), atol=1e-6, rtol=0)
    c = r.run(x[0], category=17)
    for k, q in enumerate(RATIOS):
        atol = 1e-4 if q == 0 else 5e-3
        np.testing.assert_allclose(got[0].maps[k], r.rollout(c, "max", q, 1), atol=atol, rtol=0)
        np.testing.assert_allclose(got[1].maps[k], r.grad_rollout(c, "mean", q), atol=atol, rtol=0)


def test_ratios_parse_from_a_form_field_and_are_checked():
    params = REGISTRY["rollout-sweep"].Params
    assert params(discard_ratios="0, 0.5,0.9").discard_ratios == (0.0, 0.5, 0.9)
    assert params(discard_ratios=[0.1]).discard_ratios == (0.1,)
    assert params().discard_ratios[0] == 0.0 and params().discard_ratios[-1] == 0.99
    for bad in ("0,1.0", "", "a,b", [-0.1], [0.5] * 65):
        with pytest.raises(ValidationError):
            params(discard_ratios=bad)


@pytest.mark.parametrize("fmt, pil_format", [("gif", "GIF"), ("apng", "PNG")])
def test_the_animation_has_one_labelled_frame_per_ratio(setups, fmt, pil_format):
    engine, _, x = setups["deit_tiny_patch16_224"]
    j = job("rollout-sweep", discard_ratios=(0.0, 0.5, 0.9), frame_ms=120, format=fmt)
    (res,) = engine.run(x[:1], [j])
    img = smooth_image(3, size=(200, 150))
    body, media = j.method.render(j.params, img, res, engine.shape)
    assert media == ("image/gif" if fmt == "gif" else "image/png")
    anim = Image.open(io.BytesIO(body))
    assert anim.format == pil_format and anim.size == (200, 150) and anim.n_frames == 3
    frames = []
    for k in range(3):
        anim.seek(k)
        assert anim.info.get("duration") == 120
        frames.append(np.asarray(anim.convert("RGB"), np.int16))
    assert np.abs(frames[0] - frames[2]).mean() > 1  # the frames differ
    corner = frames[0][2:12, 2:40]
    assert (corner < 30).all(axis=-1).mean() > 0.3  # the dark label box with its text
