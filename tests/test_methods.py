"""The engine against the float64 reference, on random-weight models of the three architectures."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch

from service.engine import capture as capture_module
from service.engine import ops as methods
from service.engine.capture import UnsupportedModel
from service.engine.engine import Engine
from service.methods import job
from tests import reference as ref
from tests.conftest import ARCHS, smooth_image

RATIOS = [0.0, 0.5, 0.9]


def Rollout(head_fusion="max", discard_ratio=0.9, start_layer=0):
    return job("rollout", head_fusion=head_fusion, discard_ratio=discard_ratio, start_layer=start_layer)


def GradRollout(category_id, head_fusion="mean", discard_ratio=0.9, start_layer=0):
    return job("grad-rollout", category_id=category_id, head_fusion=head_fusion, discard_ratio=discard_ratio,
               start_layer=start_layer)


def GAE(category_id, start_layer=0):
    return job("gae", category_id=category_id, start_layer=start_layer)


def LayerAttention(head=0):
    return job("attention", head=head)


def QK(layer, head, channel, which="q"):
    return job("qk", layer=layer, head=head, channel=channel, which=which)


def Predict():
    return job("predict")
FUSIONS = ["mean", "max", "min"]


def tol(ratio: float, grad: bool = False) -> float:
    """The issue's acceptance tolerances: discard makes the map depend on a threshold."""
    if ratio == 0:
        return 1e-4
    return 5e-3 if grad else 3e-3


# -- pure functions against the definitions --------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.9, 0.99])
def test_discard_zeroes_the_smallest_but_never_cls_to_cls(ratio):
    g = torch.Generator().manual_seed(1)
    f = torch.rand(3, 20, 20, generator=g, dtype=torch.float64)
    f[1, 0, 0] = -1.0  # the smallest entry of all: must survive
    got = methods.discard_lowest(f, ratio)
    for b in range(3):
        torch.testing.assert_close(got[b], ref.discard(f[b], ratio), rtol=0, atol=0)
    assert got[1, 0, 0] == -1.0


def test_the_cuda_and_cpu_kth_value_paths_agree():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(5, 1000, generator=g)
    x[2, :700] = 0  # many ties, as after the clamp of gradient rollout
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2, 3):  # the CPU path splits the rows over this many threads
            torch.set_num_threads(n_threads)
            for k in (1, 300, 900, 1000):
                torch.testing.assert_close(methods._kth_numpy(x, k), methods._kth_torch(x, k), rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)


def test_the_cpu_and_device_zeroing_paths_agree():
    g = torch.Generator().manual_seed(6)
    x = torch.rand(4, 500, generator=g)
    x[1, :300] = 0.25  # ties at the threshold are zeroed too
    thresholds = torch.tensor([[0.0], [0.25], [0.5], [1.0]])
    by_row, by_mask = x.clone(), x.clone()
    methods._zero_by_row(by_row, thresholds)
    methods._zero_by_mask(by_mask, thresholds)
    torch.testing.assert_close(by_row, by_mask, rtol=0, atol=0)
    torch.testing.assert_close(by_row, torch.where(x > thresholds, x, 0.0), rtol=0, atol=0)


def test_rollout_row_is_row_zero_of_the_normalised_product():
    g = torch.Generator().manual_seed(2)
    ws = [torch.rand(2, 9, 9, generator=g, dtype=torch.float64) for _ in range(5)]
    got = methods.rollout_row(ws)
    eye = torch.eye(9, dtype=torch.float64)
    for b in range(2):
        r = eye
        for w in ws:
            a = w[b] + eye
            r = (a / a.sum(-1, keepdim=True)) @ r
        torch.testing.assert_close(got[b], r[0])


def test_normalize_max_keeps_zero_maps_zero():
    x = torch.stack([torch.zeros(3, 3), torch.full((3, 3), 2.0)])
    out = methods.normalize_max(x)
    assert torch.equal(out[0], torch.zeros(3, 3)) and torch.equal(out[1], torch.ones(3, 3))


# -- every method on every architecture -------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_rollout_matches_reference(setups, arch, fusion):
    engine, r, x = setups[arch]
    jobs = [Rollout(fusion, ratio) for ratio in RATIOS]
    results = engine.run(x, jobs)
    for i, (j, res) in enumerate(zip(jobs, results)):
        want = r.rollout(r.run(x[i]), fusion, j.params.discard_ratio)
        assert res.maps.shape == r.grid
        np.testing.assert_allclose(res.maps, want, atol=tol(j.params.discard_ratio), rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.slow
def test_grad_rollout_matches_reference(setups, arch):
    engine, r, x = setups[arch]
    cats = [7, 123, 999]
    captured = [r.run(x[i], category=c) for i, c in enumerate(cats)]
    for fusion in FUSIONS:
        jobs = [GradRollout(c, fusion, ratio) for c, ratio in zip(cats, RATIOS)]
        for i, (j, res) in enumerate(zip(jobs, engine.run(x, jobs))):
            want = r.grad_rollout(captured[i], fusion, j.params.discard_ratio)
            np.testing.assert_allclose(res.maps, want, atol=tol(j.params.discard_ratio, grad=True), rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_attention_qk_and_predictions_match_reference(setups, arch):
    engine, r, x = setups[arch]
    heads = [0, 1, 2, "mean", "max", "min"]
    c0 = r.run(x[0])
    results = engine.run(x[[0] * len(heads)], [LayerAttention(h) for h in heads])
    for h, res in zip(heads, results):
        assert res.maps.shape == (len(c0.attn), *r.grid)
        np.testing.assert_allclose(res.maps, r.attention(c0, h), atol=1e-4, rtol=0)
    last = engine.num_layers - 1
    qks = [QK(0, 0, 0, "q"), QK(last, 2, 63, "k"), QK(5, 1, 26, "q"), QK(last, 0, 59, "k")]
    for j, res in zip(qks, engine.run(x[[1] * len(qks)], qks)):
        p = j.params
        np.testing.assert_allclose(res.maps, r.qk(r.run(x[1]), p.layer, p.head, p.channel, p.which), atol=1e-4)
    (res,) = engine.run(x[2:3], [Predict()])
    want = r.predictions(r.run(x[2]))
    assert [p.class_id for p in res.predictions] == [c for c, _ in want]
    np.testing.assert_allclose([p.score for p in res.predictions], [s for _, s in want], rtol=1e-4)


# -- properties of the engine ------------------------------------------------------------------
MIXED = [
    Rollout("max", 0.9), GradRollout(3, "mean", 0.9), LayerAttention("mean"), QK(2, 1, 10, "k"),
    Rollout("mean", 0.0), GradRollout(500, "max", 0.5), Predict(), Rollout("min", 0.5),
]


def _same(a, b, atol=1e-5):
    if a.maps is not None:
        np.testing.assert_allclose(a.maps, b.maps, atol=atol, rtol=0)
    assert [p.class_id for p in a.predictions] == [p.class_id for p in b.predictions]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.slow
def test_batch_never_changes_an_items_answer(setups, models, arch):
    engine, _, _ = setups[arch]
    x = torch.stack([ref.preprocess(smooth_image(10 + i), models[arch]) for i in range(len(MIXED))])
    together = engine.run(x, MIXED)
    for i, j in enumerate(MIXED):
        _same(together[i], engine.run(x[i : i + 1], [j])[0])


@pytest.mark.parametrize("chunk", [2, 3, 64])
@pytest.mark.slow
def test_the_chunk_size_of_taken_attention_never_changes_an_answer(setups, models, monkeypatch, chunk):
    """On the CPU the plain pass takes attention one image at a time; an accelerator takes the whole
    batch. Chunks of several images, runs of equal jobs across and within them, must give the same."""
    engine, r, _ = setups["deit_tiny_patch16_224"]
    m = models["deit_tiny_patch16_224"]
    jobs = MIXED + [Rollout("max", 0.9)] * 3 + [LayerAttention(1)] * 2
    x = torch.stack([ref.preprocess(smooth_image(30 + i), m) for i in range(len(jobs))])
    one_by_one = engine.run(x, jobs)
    monkeypatch.setattr(capture_module, "CPU_CHUNK", chunk)
    for a, b in zip(engine.run(x, jobs), one_by_one):
        _same(a, b, atol=1e-6)
    np.testing.assert_allclose(one_by_one[9].maps, r.rollout(r.run(x[9]), "max", 0.9), atol=tol(0.9), rtol=0)


def test_fused_and_unfused_models_give_the_same_maps(models):
    m = models["deit_tiny_patch16_224"]
    fused = Engine(copy.deepcopy(m), torch.device("cpu"))
    unfused_model = copy.deepcopy(m)
    for blk in unfused_model.blocks:
        blk.attn.fused_attn = False
    unfused = Engine(unfused_model, torch.device("cpu"))
    assert all(b.attn.fused_attn for b in fused.model.blocks)
    x = torch.stack([ref.preprocess(smooth_image(20 + i), m) for i in range(len(MIXED))])
    for a, b in zip(fused.run(x, MIXED), unfused.run(x, MIXED)):
        _same(a, b)


def test_engine_leaves_weights_frozen_and_model_unchanged(setups):
    engine, _, x = setups["deit_tiny_patch16_224"]
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    engine.run(x, [GradRollout(1), GradRollout(2), Rollout()])
    assert not any(p.requires_grad for p in engine.model.parameters())
    assert all(p.grad is None for p in engine.model.parameters())
    for k, v in engine.model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize(
    "kwargs, why",
    [
        (dict(model_name="resnet10t"), "no `blocks` of global self-attention"),
        (dict(model_name="convnext_atto"), "no `blocks` of global self-attention"),
        (dict(model_name="swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1)), "windowed attention"),
        (dict(model_name="vit_tiny_patch16_224", depth=2, global_pool="max"), "global_pool='max'"),
        (dict(model_name="vit_tiny_patch16_224", depth=2, global_pool="prr"), "AttentionPoolPrr has no adapter"),
        (dict(model_name="vit_tiny_patch16_224", depth=2, class_token=False, global_pool="map",
              pool_include_prefix=False), None),
    ],
)
def test_models_the_methods_cannot_serve_are_refused(kwargs, why):
    model = timm.create_model(pretrained=False, **kwargs)
    if why is None:  # a MAP head with two latent queries: two rows, none of them the one explained
        model.attn_pool.latent_len = 2
        model.attn_pool.latent = torch.nn.Parameter(model.attn_pool.latent.repeat(1, 2, 1))
        why = "2 latent queries"
    with pytest.raises(UnsupportedModel, match=why):
        Engine(model, torch.device("cpu"))


def test_an_attention_the_table_does_not_know_is_refused_by_its_class():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)

    class MyAttention(torch.nn.Module):
        def forward(self, x):
            return x

    model.blocks[1].attn = MyAttention()
    with pytest.raises(UnsupportedModel, match="MyAttention has no adapter"):
        Engine(model, torch.device("cpu"))


def test_a_hybrid_vit_warms_up_and_matches_the_reference():
    """A conv stem before the patch projection: the input is not grid x patch (224 px -> 7 x 7 tokens of 8 px
    stem features). Warm-up used to build a 56 px input for it and the model never became ready."""
    torch.manual_seed(5)
    m = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, depth=3).eval()
    engine = Engine(copy.deepcopy(m), torch.device("cpu"))
    assert engine.input_size == (224, 224) and engine.grid == (7, 7)
    engine.warmup([Rollout(), GradRollout(0)])
    x = torch.stack([ref.preprocess(smooth_image(40 + i), m) for i in range(2)])
    r = ref.Reference(m)
    cases = [
        (Rollout("mean", 0.0), lambda i: r.rollout(r.run(x[i]), "mean", 0.0), tol(0.0)),
        (GradRollout(3, "mean", 0.0), lambda i: r.grad_rollout(r.run(x[i], 3), "mean", 0.0), tol(0.0, grad=True)),
    ]
    for j, want, atol in cases:
        got = engine.run(x, [j, j])
        for i in range(2):
            np.testing.assert_allclose(got[i].maps, want(i), atol=atol, rtol=0)
