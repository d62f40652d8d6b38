"""Faithfulness curves (deletion / insertion) against the float64 reference, alone and in mixed batches."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch

from service.engine import faithfulness as fa
from service.engine.engine import Engine
from service.methods import job
from tests import reference as ref
from tests.conftest import ARCHS, smooth_image


def sharpen(model: torch.nn.Module, gain: float = 40.0) -> torch.nn.Module:
    """A copy whose head is scaled up: a random-weight model's probabilities are all about 1/1000 and
    barely move when patches are removed; with larger logits the curves rise and fall."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.head.weight.mul_(gain)
    return m


@pytest.fixture(scope="module")
def sharp(models):
    """Per architecture: (engine, reference, 3 preprocessed images) of the sharpened model."""
    out = {}
    for arch in ARCHS:
        m = sharpen(models[arch])
        x = torch.stack([ref.preprocess(smooth_image(s), m) for s in range(3)])
        out[arch] = (Engine(copy.deepcopy(m), torch.device("cpu")), ref.Reference(m), x)
    return out


def close(got: fa.Curves, want: ref.ReferenceCurves) -> None:
    np.testing.assert_allclose(got.deletion, want.deletion, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.insertion, want.insertion, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([got.deletion_auc, got.insertion_auc], [want.deletion_auc, want.insertion_auc],
                               rtol=1e-4, atol=1e-6)


# -- the pieces against the definition -------------------------------------------------------------
def test_patch_order_breaks_ties_by_lower_index_and_least_reverses():
    m = np.array([[0.5, 1.0, 0.5], [0.0, 1.0, 0.2]], np.float32)
    assert ref.patch_order(m) == [1, 4, 0, 2, 5, 3]
    for order in ("most", "least"):
        r = fa.ranks(torch.from_numpy(m)[None], order)[0].tolist()
        assert sorted(range(6), key=lambda i: r[i]) == ref.patch_order(m, order)


@pytest.mark.parametrize("size,grid", [((224, 224), (14, 14)), ((224, 224), (7, 7)), ((24, 40), (3, 2))])
def test_blur_and_mean_removal_match_the_dense_reference(size, grid):
    """Includes a Gaussian whose taps reach past the whole image (24 px, sigma 8: 32 taps each way)."""
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    patch = (size[0] / grid[0], size[1] / grid[1])
    for how in ("blur", "mean"):
        got = fa.removed(x, how, patch)
        for i in range(2):
            want = ref.fully_removed(x[i].double(), how, grid)
            torch.testing.assert_close(got[i].double(), want, rtol=0, atol=2e-5)


def test_steps_remove_floor_s_p_over_k_and_the_area_is_the_trapezoid():
    assert fa.counts(4, 49) == [0, 12, 24, 36, 49]
    assert fa.counts(64, 49)[:4] == [0, 0, 1, 2]
    assert fa.area([1.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert fa.area([0.2, 0.4]) == pytest.approx(ref.trapezoid([0.2, 0.4]))


# -- the engine's curves against the reference ------------------------------------------------------
CASES = [
    ("rollout", {}, dict(faithfulness_steps=6)),
    ("grad-rollout", {"category_id": 7}, dict(faithfulness_steps=5, removal="mean", order="least")),
    ("gae", {"category_id": 3}, dict(faithfulness_steps=4, removal="blur", order="least")),
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.slow
def test_curves_match_the_reference_alone(sharp, arch):
    engine, r, x = sharp[arch]
    for i, (name, params, opts) in enumerate(CASES):
        (res,) = engine.run(x[i : i + 1], [job(name, faithfulness=True, **params, **opts)])
        (curves,) = res.faithfulness
        cls = params.get("category_id", res.predictions[0].class_id)
        assert curves.class_id == cls and len(curves.deletion) == opts["faithfulness_steps"] + 1
        close(curves, ref.faithfulness(r, x[i], res.maps, cls, opts["faithfulness_steps"],
                                       opts.get("removal", "blur"), opts.get("order", "most")))
        # the endpoints are the image itself and the fully removed image
        assert curves.deletion[0] == pytest.approx(curves.insertion[-1], rel=1e-6)
        assert curves.deletion[-1] == pytest.approx(curves.insertion[0], rel=1e-6)


def test_more_steps_than_patches_on_a_small_non_square_grid():
    """A 48 x 80 input of 3 x 5 patches (15 < 20 steps): steps repeat counts; the blur is wider than the image."""
    m = sharpen(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(48, 80), num_classes=10).eval(),
                20)
    engine, r = Engine(copy.deepcopy(m), torch.device("cpu")), ref.Reference(m)
    x = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(3))
    res = engine.run(x, [job("rollout", faithfulness=True, faithfulness_steps=20),
                         job("gae", category_id=4, faithfulness=True, faithfulness_steps=7, removal="mean")])
    close(res[0].faithfulness[0], ref.faithfulness(r, x[0], res[0].maps, res[0].predictions[0].class_id, 20))
    close(res[1].faithfulness[0], ref.faithfulness(r, x[1], res[1].maps, 4, 7, "mean"))
    assert res[0].faithfulness[0].deletion[1] == res[0].faithfulness[0].deletion[0]  # floor(15 / 20) = 0 removed


def test_a_sweep_scores_every_frame(sharp):
    engine, r, x = sharp["vit_small_patch32_224"]
    (sw,) = engine.run(x[1:2], [job("grad-rollout-sweep", category_id=2, discard_ratios=(0.0, 0.9),
                                    faithfulness=True, faithfulness_steps=4, removal="mean")])
    assert len(sw.faithfulness) == 2
    for frame, curves in zip(sw.maps, sw.faithfulness):
        close(curves, ref.faithfulness(r, x[1], frame, 2, 4, "mean"))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.slow
def test_a_mixed_batch_answers_as_each_image_alone(sharp, arch):
    """10 images: methods with and without the option, other methods, both passes, every removal and order."""
    engine, r, x = sharp[arch]
    jobs = []
    for i in range(10):
        opts = dict(faithfulness=i % 5 != 4, faithfulness_steps=2 + i % 3, removal=("blur", "mean")[i % 2],
                    order=("most", "least")[(i // 2) % 2])
        jobs.append([
            job("rollout", head_fusion="mean", **opts), job("grad-rollout", category_id=i, **opts),
            job("gae", category_id=5, **opts), job("qk", layer=0, head=0, channel=1), job("predict"),
            job("rollout-sweep", discard_ratios=(0.5, 0.0), **opts), job("attention", head="max"),
            job("rollout", **opts),
        ][i % 8])
    images = torch.cat([x, x, x, x[:1]])  # 10 rows, three distinct images
    batch = engine.run(images, jobs)
    for i, (j, got) in enumerate(zip(jobs, batch)):
        (alone,) = engine.run(images[i : i + 1], [j])
        if alone.faithfulness is None:
            assert got.faithfulness is None
            continue
        for g, a in zip(got.faithfulness, alone.faithfulness):
            assert (g.class_id, g.steps, g.removal, g.order) == (a.class_id, a.steps, a.removal, a.order)
            np.testing.assert_allclose(g.deletion, a.deletion, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(g.insertion, a.insertion, rtol=1e-4, atol=1e-6)
    # and one of them against the reference
    i = 1
    p = jobs[i].params
    close(batch[i].faithfulness[0], ref.faithfulness(r, images[i], batch[i].maps, p.category_id,
                                                     p.faithfulness_steps, p.removal, p.order))


def test_without_the_option_no_curves_and_the_same_maps(setups):
    engine, _, x = setups["deit_tiny_patch16_224"]
    plain = engine.run(x[:2], [job("rollout"), job("gae", category_id=1)])
    asked = engine.run(x[:2], [job("rollout", faithfulness=True, faithfulness_steps=2),
                               job("gae", category_id=1, faithfulness=True, faithfulness_steps=2)])
    for a, b in zip(plain, asked):
        assert a.faithfulness is None and b.faithfulness is not None
        np.testing.assert_array_equal(a.maps, b.maps)


# -- on the demo model: a good map is more faithful than a random one -------------------------------
@pytest.mark.slow  # the demo model over held-out scenes: a minute or two on 2 cores
def test_grad_rollout_deletes_faster_than_a_random_map_on_held_out_scenes():
    from demo.evaluate import EVAL_SEED, load, model_input
    from demo.scenes import make_scene, scene_rng

    engine, pre = load()
    scenes = [make_scene(scene_rng(EVAL_SEED, i), 1) for i in range(24)]
    x = torch.stack([model_input(engine, pre, img) for img, _ in scenes])
    classes = [objects[0][0] for _, objects in scenes]
    res = engine.run(x, [job("grad-rollout", category_id=c, faithfulness=True, faithfulness_steps=8) for c in classes])
    grad = [r.faithfulness[0] for r in res]
    rng = np.random.default_rng(0)
    asks = [fa.Ask(torch.from_numpy(rng.random((1, *engine.grid))), (c,), 8, "blur", "most") for c in classes]
    rand = [f[0] for f in fa.score(engine.model, x, asks, engine.grid, 64)]
    g_del, r_del = np.mean([c.deletion_auc for c in grad]), np.mean([c.deletion_auc for c in rand])
    g_ins, r_ins = np.mean([c.insertion_auc for c in grad]), np.mean([c.insertion_auc for c in rand])
    assert g_del < r_del - 0.05, (g_del, r_del)
    assert g_ins > r_ins, (g_ins, r_ins)
