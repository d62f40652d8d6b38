"""Every timm family the engine explains, every method, against the float64 reference (tests/reference.py),
whose attention functions are its own per family. Small random-weight models (tests/families.py)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from service.engine import adapters
from service.engine import capture as capture_module
from service.engine.engine import Engine
from service.methods import compare as cmp
from service.methods import job
from tests import families
from tests import reference as ref

ROOT = Path(__file__).resolve().parents[1]


def tol(ratio: float, grad: bool = False) -> float:
    """As tests/test_methods.py: discard makes a map depend on a threshold."""
    return 1e-4 if ratio == 0 else 5e-3 if grad else 3e-3


@pytest.fixture(scope="module")
def built() -> dict[str, tuple[Engine, ref.Reference, torch.Tensor]]:
    """Per family: the engine, the reference of the same weights, 3 model inputs (3, H, W)."""
    out = {}
    for i, fam in enumerate(families.FAMILIES):
        m = families.make(fam, seed=i)
        engine = Engine(copy.deepcopy(m), torch.device("cpu"))
        g = torch.Generator().manual_seed(100 + i)
        out[fam] = (engine, ref.Reference(m), torch.randn(3, 3, *engine.input_size, generator=g))
    return out


class Want:
    """The reference's captures of each image, with and without a class's gradients, made once."""

    def __init__(self, r: ref.Reference, x: torch.Tensor) -> None:
        self.r, self.x, self.memo = r, x, {}

    def __call__(self, i: int, category: int | None = None) -> ref.Captured:
        if (i, category) not in self.memo:
            self.memo[i, category] = self.r.run(self.x[i], category)
        return self.memo[i, category]


def cases(r: ref.Reference, w: Want) -> list[tuple]:
    """(method, the job, the image, its reference map, tolerance): every method of families.METHODS, with
    fusions, discard ratios and start layers that reach every part of the definition."""
    return [
        ("rollout", job("rollout", head_fusion="max", discard_ratio=0.9), 0, lambda: r.rollout(w(0), "max", 0.9),
         tol(0.9)),
        ("rollout", job("rollout", head_fusion="mean", discard_ratio=0.0, start_layer=1), 1,
         lambda: r.rollout(w(1), "mean", 0.0, 1), tol(0)),
        ("rollout", job("rollout", head_fusion="min", discard_ratio=0.5), 2, lambda: r.rollout(w(2), "min", 0.5),
         tol(0.5)),
        ("grad-rollout", job("grad-rollout", category_id=3, head_fusion="mean", discard_ratio=0.0), 0,
         lambda: r.grad_rollout(w(0, 3), "mean", 0.0), tol(0, True)),
        ("grad-rollout", job("grad-rollout", category_id=7, head_fusion="max", discard_ratio=0.5, start_layer=1), 1,
         lambda: r.grad_rollout(w(1, 7), "max", 0.5, 1), tol(0.5, True)),
        ("gae", job("gae", category_id=3), 2, lambda: r.gae(w(2, 3)), tol(0, True)),
        ("gae", job("gae", category_id=5, start_layer=1), 0, lambda: r.gae(w(0, 5), 1), tol(0, True)),
        ("attention", job("attention", head=1), 1, lambda: r.attention(w(1), 1), 1e-4),
        ("attention", job("attention", head="max"), 2, lambda: r.attention(w(2), "max"), 1e-4),
        ("qk", job("qk", layer=1, head=2, channel=5, which="q"), 0, lambda: r.qk(w(0), 1, 2, 5, "q"), 1e-4),
        ("qk", job("qk", layer=0, head=0, channel=31, which="k"), 1, lambda: r.qk(w(1), 0, 0, 31, "k"), 1e-4),
        ("rollout-sweep", job("rollout-sweep", discard_ratios=(0.0, 0.5), head_fusion="mean", format="json"), 2,
         lambda: np.stack([r.rollout(w(2), "mean", q) for q in (0.0, 0.5)]), tol(0.5)),
        ("grad-rollout-sweep", job("grad-rollout-sweep", category_id=3, discard_ratios=(0.0,), format="json"), 0,
         lambda: np.stack([r.grad_rollout(w(0, 3), "mean", 0.0)]), tol(0, True)),
    ]


@pytest.mark.parametrize("family", families.FAMILIES)
def test_every_method_matches_the_reference_in_one_mixed_batch_and_alone(built, family):
    engine, r, x = built[family]
    w = Want(r, x)
    todo = cases(r, w)
    assert {c[0] for c in todo} | {"compare", "predict"} == set(families.METHODS)
    together = engine.run(x[[c[2] for c in todo]], [c[1] for c in todo])  # both passes, every method at once
    for (name, j, _, want, atol), got in zip(todo, together):
        np.testing.assert_allclose(got.maps, want(), atol=atol, rtol=0, err_msg=f"{family} {name} {j.params}")
    for name, j, i, want, atol in todo[::4]:  # alone, in a batch of one
        (got,) = engine.run(x[i : i + 1], [j])
        np.testing.assert_allclose(got.maps, want(), atol=atol, rtol=0, err_msg=f"{family} {name} alone")
    (got,) = engine.run(x[:1], [job("predict")])
    want = r.predictions(w(0))
    assert [p.class_id for p in got.predictions] == [c for c, _ in want]
    np.testing.assert_allclose([p.score for p in got.predictions], [s for _, s in want], rtol=1e-4)


@pytest.mark.parametrize("family", families.FAMILIES)
def test_compare_gives_each_setting_the_reference_map(built, family):
    engine, r, x = built[family]
    w = Want(r, x)
    settings = cmp.validate([("rollout", {"head_fusion": "mean", "discard_ratio": 0.0}), ("gae", {"category_id": 4}),
                             ("grad-rollout", {"category_id": 4, "discard_ratio": 0.0})], engine.shape)
    jobs = cmp.plan(settings, engine.shape, 2, "mean", "most")
    results = engine.run(x[[0] * len(jobs)], [j for j, _ in jobs])
    got = cmp.answer("m", engine.shape, settings, jobs, results, "most")["results"]
    wants = [r.rollout(w(0), "mean", 0.0), r.gae(w(0, 4)), r.grad_rollout(w(0, 4), "mean", 0.0)]
    for g, want in zip(got, wants):
        np.testing.assert_allclose(np.asarray(g["mask"]), want, atol=1e-4, rtol=0, err_msg=g["method"])


def test_the_anatomy_reads_what_the_classifier_reads(built):
    """The explained row is set by the head: class token, patch mean, or attention pooling (and which tokens
    that pooling reads)."""
    got = {f: (e.shape.pooling, e.shape.prefix, e.shape.pool_skip, e.grid) for f, (e, _, _) in built.items()}
    assert got["vit"] == ("token", 1, 0, (6, 6)) and got["deit-distilled"] == ("token", 2, 0, (6, 6))
    assert got["vit-reg"] == ("token", 3, 0, (6, 6)) and got["vit-avg"] == ("avg", 0, 0, (6, 6))
    assert got["vit-map"] == ("map", 0, 0, (6, 6)) and got["vit-map-reg"] == ("map", 3, 3, (6, 6))
    assert got["eva02"] == ("avg", 1, 0, (7, 7)) and got["beit"] == ("avg", 1, 0, (6, 6))
    engine = built["vit-map"][0]
    (res,) = engine.run(built["vit-map"][2][:1], [job("attention", head="mean")])
    assert res.maps.shape == (engine.num_layers + 1, 6, 6)  # every block, then the pooling head


def test_a_deep_copy_of_an_installed_model_captures_with_its_own_weights(built):
    """The capturing forward is bound to its module: a deep copy of the model binds the copy's."""
    engine, _, x = built["beit"]
    twin, bare = copy.deepcopy(engine.model), families.make("beit", seed=list(families.FAMILIES).index("beit"))
    with torch.no_grad():
        for p, q in zip(twin.parameters(), bare.parameters()):
            p.mul_(0.5)
            q.mul_(0.5)
    own = Engine(bare, torch.device("cpu")).model
    with torch.no_grad(), capture_module.capture(attn_layers=frozenset({0, 1})) as got:
        twin(x[:1])
    with torch.no_grad(), capture_module.capture(attn_layers=frozenset({0, 1})) as want:
        own(x[:1])
    for b in (0, 1):
        torch.testing.assert_close(got.attn[b], want.attn[b], rtol=1e-4, atol=1e-6)


# -- a capture of the wrong tensor is caught --------------------------------------------------------------
def _before_bias(a: adapters.Adapter) -> adapters.Adapter:
    return dataclasses.replace(a, split=lambda *args, **kw: a.split(*args, **kw)._replace(bias=None))


def _before_rotary(a: adapters.Adapter) -> adapters.Adapter:
    return dataclasses.replace(a, split=lambda m, x, rope=None, **kw: a.split(m, x, None, **kw))


def _pre_softmax(q, k, scale, mask):
    scores = (q * scale) @ k.transpose(-2, -1)
    return scores if mask is None else scores + mask


@pytest.mark.parametrize("mutation, family", [("pre-softmax", "vit-avg"), ("before-bias", "beit"),
                                              ("before-bias", "beit-shared"), ("before-rotary", "eva02")])
def test_an_adapter_that_captures_the_wrong_tensor_fails_the_reference(built, monkeypatch, mutation, family):
    """The check above, run on an engine whose capture is wrong: pre-softmax scores, the attention before
    the relative position bias, q and k before the rotary embedding. Each must fail it; the same check
    on the right capture passes."""
    _, r, x = built[family]
    m = families.make(family, seed=list(families.FAMILIES).index(family))
    w = Want(r, x)
    jobs = [job("attention", head="mean"), job("rollout", head_fusion="mean", discard_ratio=0.0),
            job("qk", layer=1, head=0, channel=1, which="q")]
    wants = [r.attention(w(0), "mean"), r.rollout(w(0), "mean", 0.0), r.qk(w(0), 1, 0, 1, "q")]

    def check(engine: Engine) -> None:
        for got, want in zip(engine.run(x[[0, 0, 0]], jobs), wants):
            np.testing.assert_allclose(got.maps, want, atol=1e-4, rtol=0)

    check(Engine(copy.deepcopy(m), torch.device("cpu")))
    if mutation == "pre-softmax":
        monkeypatch.setattr(capture_module, "_softmax_attention", _pre_softmax)
    else:
        kind = type(built[family][0].anatomy.attentions[0])
        bad = (_before_bias if mutation == "before-bias" else _before_rotary)(adapters.ADAPTERS[kind])
        monkeypatch.setitem(adapters.ADAPTERS, kind, bad)
    with pytest.raises(AssertionError):
        check(Engine(copy.deepcopy(m), torch.device("cpu")))


# -- the coverage table of docs/models.md ------------------------------------------------------------------
def test_the_coverage_table_in_the_docs_is_the_one_these_tests_prove():
    assert families.table() in (ROOT / "docs" / "models.md").read_text(), (
        "docs/models.md: paste the output of `python -m tests.families`")


# -- served through HTTP, side by side in one pool -------------------------------------------------------------
SERVED = ("vit-avg", "vit-map", "eva02", "beit")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import timm
    from timm.models import save_for_hf

    from tests.server import running_server

    root = tmp_path_factory.mktemp("families")
    args = ["--max-delay-ms", "30", "--max-batch-size", "8"]
    for fam in SERVED:
        model = families.make(fam, seed=list(families.FAMILIES).index(fam))
        save_for_hf(model, str(root / fam), safe_serialization=True)
        args += ["--model", f"{fam}=local-dir:{root / fam}"]
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1), num_classes=10)
    save_for_hf(swin, str(root / "swin"), safe_serialization=True)
    args += ["--model", f"swin=local-dir:{root / 'swin'}"]
    with running_server(args) as s:
        yield s.url


def test_each_family_is_served_with_its_reference_maps_and_swin_is_refused(server, built):
    import concurrent.futures

    import httpx
    import timm

    from tests.conftest import png_bytes, smooth_image

    with httpx.Client(base_url=server, timeout=120) as client:
        listed = {m["name"]: m for m in client.get("/models").json()}
        assert listed["swin"]["status"] == "unavailable" and "windowed attention" in listed["swin"]["reason"]
        for fam in SERVED:
            engine = built[fam][0]
            info = listed[fam]
            assert info["status"] == "ready" and info["source"] == "timm", info
            assert (info["family"], tuple(info["grid"]), info["prefix_tokens"], info["pooling"]) == (
                engine.anatomy.family, engine.grid, engine.prefix, engine.shape.pooling)

        def ask(fam: str, path: str, fields: dict) -> tuple[str, str, np.ndarray]:
            img = smooth_image(7, engine_sizes[fam])  # at the input size: the resize changes nothing
            r = client.post(path, files={"image": ("x.png", png_bytes(img), "image/png")},
                            data={"model": fam, "format": "json", **{k: str(v) for k, v in fields.items()}})
            assert r.status_code == 200, r.text
            body = r.json()
            return fam, path, np.asarray(body["mask"] if "mask" in body else body["layers"])

        engine_sizes = {f: tuple(reversed(built[f][0].input_size)) for f in SERVED}
        asks = [(f, p, q) for f in SERVED for p, q in (("/rollout", {"head_fusion": "mean", "discard_ratio": 0.0}),
                                                        ("/gae", {"category_id": 2}), ("/attention", {"head": "max"}))]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:  # the families' batches side by side
            answers = list(pool.map(lambda a: ask(*a), asks))
    for fam, path, got in answers:
        m = families.make(fam, seed=list(families.FAMILIES).index(fam))
        cfg = timm.data.resolve_model_data_config(m)
        pixels = np.asarray(smooth_image(7, engine_sizes[fam]), np.float32) / 255.0
        x = (torch.from_numpy(pixels).permute(2, 0, 1) - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(
            cfg["std"])[:, None, None]
        r = built[fam][1]
        if path == "/rollout":
            want = r.rollout(r.run(x), "mean", 0.0)
        elif path == "/gae":
            want = r.gae(r.run(x, 2))
        else:
            want = r.attention(r.run(x), "max")
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0, err_msg=f"{fam} {path}")
