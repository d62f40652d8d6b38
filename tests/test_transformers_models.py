"""Hugging Face `transformers` classifiers as a second model source (service/hf_models.py) and their
attention adapter (service/engine/adapters/transformers_models.py), against the float64 reference (tests/reference.py).

Tiny random-weight models of every family, built offline from a config and saved with save_pretrained
beside a ViTImageProcessor's preprocessor_config.json."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from service import hf_models, models  # noqa: E402
from service.engine import adapters  # noqa: E402
from service.engine import capture as capture_module  # noqa: E402
from service.engine.adapters import transformers_models as adapter  # noqa: E402
from tests import reference as ref  # noqa: E402

SMALL = dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=3, num_labels=10)  # head_dim 32
VIT_LIKE = dict(SMALL, intermediate_size=64, image_size=32, patch_size=8)
DINO = dict(SMALL, mlp_ratio=2, image_size=32, patch_size=8)

# name -> (model class, config class, config kwargs): every family the transformers source serves
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "vit": ("ViTForImageClassification", "ViTConfig", VIT_LIKE),
    "deit-teacher": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", VIT_LIKE),
    "deit": ("DeiTForImageClassification", "DeiTConfig", VIT_LIKE),
    "beit": ("BeitForImageClassification", "BeitConfig", dict(VIT_LIKE, use_relative_position_bias=True)),
    "dinov2": ("Dinov2ForImageClassification", "Dinov2Config", DINO),
    "dinov2-reg": ("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersConfig",
                   dict(DINO, num_register_tokens=4)),
    "vit-tall": ("ViTForImageClassification", "ViTConfig", dict(VIT_LIKE, image_size=[48, 32])),  # a 6 x 4 grid
}
PREFIX = {"vit": 1, "deit-teacher": 2, "deit": 2, "beit": 1, "dinov2": 1, "dinov2-reg": 5, "vit-tall": 1}


def size_of(family: str) -> tuple[int, int]:
    """(H, W) the family's model takes."""
    s = FAMILIES[family][2]["image_size"]
    return (s, s) if isinstance(s, int) else tuple(s)


def grid_of(family: str) -> tuple[int, int]:
    h, w = size_of(family)
    return (h // 8, w // 8)


def save(family: str, root: Path, seed: int = 0, **processor) -> Path:
    """A random-weight model of `family` saved the way save_pretrained writes it, its image processor beside."""
    model_cls, config_cls, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
    _randomise(hf, seed)
    folder = root / family
    hf.save_pretrained(folder)
    h, w = size_of(family)
    transformers.ViTImageProcessor(size={"height": h, "width": w}, **processor).save_pretrained(folder)
    return folder


def _randomise(hf: torch.nn.Module, seed: int) -> None:
    """Weights that make every part count: transformers initialises biases, BEiT's relative position
    table and DeiT's tokens to zero, which would hide a capture that skips them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1 and "norm" not in name or "relative_position" in name or "token" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {f: save(f, root, seed=i) for i, f in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def hf_models_(hf_dirs) -> dict[str, hf_models.HFClassifier]:
    return {f: models.create(models.ModelSpec.parse(f"{f}=transformers:{d}")) for f, d in hf_dirs.items()}


def inputs(n: int, size: tuple[int, int] = (32, 32), seed: int = 0) -> torch.Tensor:
    """(n, 3, H, W): model inputs with structure (not only noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, size[0] // 8, size[1] // 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear") + \
        0.3 * torch.randn(n, 3, *size, generator=g)


# -- the source: specs, loading, preprocessing ------------------------------------------------------
def test_a_transformers_spec_names_its_source_and_alias():
    s = models.ModelSpec.parse("transformers:google/vit-base-patch16-224")
    assert (s.alias, s.source, s.uses_hub) == ("vit-base-patch16-224", "transformers", True)
    s = models.ModelSpec.parse("mine=transformers:/srv/models/vit")
    assert (s.alias, s.source, s.uses_hub) == ("mine", "transformers", False)
    assert models.ModelSpec.parse("deit_tiny_patch16_224").source == "timm"


@pytest.mark.parametrize("text", ["x=onnx:/m/model.onnx", "torchhub:facebookresearch/dino", "Transformer:/m"])
def test_an_unknown_source_is_refused_naming_the_known_ones(text):
    with pytest.raises(ValueError, match="unknown model source.*hf-hub:, local-dir:, transformers:"):
        models.ModelSpec.parse(text)


def test_serve_exits_2_on_an_unknown_source():
    from service.cli import serve

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert serve.main(["--model", "x=onnx:/m/model.onnx", "--port", "1"]) == 2
    assert "unknown model source 'onnx'" in err.getvalue() and "transformers:" in err.getvalue()


def test_explain_and_compare_in_process_exit_2_on_an_unknown_source(tmp_path, capsys):
    from service.cli import compare, explain
    from tests.conftest import png_bytes, smooth_image

    img = tmp_path / "a.png"
    img.write_bytes(png_bytes(smooth_image(1, (32, 32))))
    assert explain.main([str(img), "--model", "x=onnx:/m/model.onnx"]) == 2
    assert "unknown model source 'onnx'" in capsys.readouterr().err
    assert compare.main([str(img), "--model", "x=onnx:/m/model.onnx", "--setting", "rollout"]) == 2
    assert "unknown model source 'onnx'" in capsys.readouterr().err


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_loads_with_its_parts(hf_models_, family):
    m = hf_models_[family]
    a = adapters.describe(m)
    assert a.grid == grid_of(family) and a.prefix == PREFIX[family] and len(a.blocks) == 3 and a.heads == 3
    assert a.pooling == ("avg" if family == "beit" else "token") and a.source == "transformers"
    labels = tuple(f"LABEL_{i}" for i in range(10))
    assert (a.input_size, a.labels, a.embed_dim, a.head_dim) == (size_of(family), labels, 96, 32)
    assert m.hf.config._attn_implementation == adapter.ATTN_IMPLEMENTATION


def test_labels_come_from_id2label(tmp_path):
    folder = save("vit", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["id2label"] = {str(i): f"kind {i}" for i in range(10)}
    cfg["label2id"] = {f"kind {i}": i for i in range(10)}
    (folder / "config.json").write_text(json.dumps(cfg))
    m = models.create(models.ModelSpec.parse(f"transformers:{folder}"))
    assert adapters.describe(m).labels == tuple(f"kind {i}" for i in range(10))


@pytest.mark.parametrize("processor", [
    dict(image_mean=[0.3, 0.4, 0.5], image_std=[0.2, 0.25, 0.3]),
    dict(rescale_factor=2 / 255, image_mean=[0.9, 1.0, 1.1], image_std=[0.5, 0.6, 0.7]),
    dict(do_normalize=False),
])
def test_preprocessing_equals_the_image_processors(tmp_path, processor):
    """The engine's x / 255 then (x - mean) / std, with the rescale factor folded in, gives what the
    model's own image processor gives for the same pixels at the input size."""
    from service.engine.engine import Engine

    folder = save("vit", tmp_path, **processor)
    m = models.create(models.ModelSpec.parse(f"transformers:{folder}"))
    pre = models.Preprocess.from_anatomy(adapters.describe(m))
    assert pre.size == (32, 32) and pre.interpolation == "bilinear"
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    want = transformers.ViTImageProcessor.from_pretrained(folder)(list(pixels), do_resize=False,
                                                                  return_tensors="pt")["pixel_values"]
    got = Engine(m, torch.device("cpu")).prepare(torch.from_numpy(pixels))
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


def test_the_crop_size_is_the_input_size(tmp_path):
    folder = save("vit", tmp_path)
    cfg = json.loads((folder / "preprocessor_config.json").read_text())
    cfg.update(do_center_crop=True, crop_size={"height": 32, "width": 32}, size={"shortest_edge": 40}, resample=3)
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg))
    m = models.create(models.ModelSpec.parse(f"transformers:{folder}"))
    pre = models.Preprocess.from_anatomy(adapters.describe(m))
    assert pre.size == (32, 32) and pre.interpolation == "bicubic"


# -- refusals ----------------------------------------------------------------------------------------
def _refused(folder: Path, match: str) -> None:
    with pytest.raises(hf_models.Refused, match=match):
        models.create(models.ModelSpec.parse(f"transformers:{folder}"))


def test_a_folder_without_config_or_weights_or_processor_is_refused(tmp_path):
    folder = save("vit", tmp_path)
    _refused(tmp_path / "missing", "no such folder")
    (folder / "model.safetensors").rename(tmp_path / "weights")
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    _refused(folder, r"no safetensors weights .*pickled weights \(pytorch_model.bin\) are never loaded")
    (tmp_path / "weights").rename(folder / "model.safetensors")
    (folder / "preprocessor_config.json").rename(tmp_path / "pre")
    _refused(folder, "no preprocessor_config.json")
    (tmp_path / "pre").rename(folder / "preprocessor_config.json")
    (folder / "config.json").unlink()
    _refused(folder, "no config.json")


@pytest.mark.parametrize("file", ["config.json", "preprocessor_config.json"])
def test_a_config_that_needs_remote_code_is_refused_and_runs_nothing(tmp_path, file):
    folder = save("vit", tmp_path)
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                    "from transformers import ViTForImageClassification as Evil\n")
    cfg = json.loads((folder / file).read_text())
    cfg["auto_map"] = {"AutoModelForImageClassification": "evil.Evil"}
    (folder / file).write_text(json.dumps(cfg))
    _refused(folder, "auto_map.*never runs code.*trust_remote_code")
    assert not marker.exists()


@pytest.mark.parametrize("archs, match", [
    (["SwinForImageClassification"], "no attention adapter for SwinForImageClassification.*ViTForImageClassification"),
    (["ConvNextForImageClassification"], "no attention adapter for ConvNextForImageClassification"),
    (["ViTForImageClassification", "ViTModel"], "one model class"),
    (None, "one model class"),
])
def test_a_family_without_an_adapter_is_refused(tmp_path, archs, match):
    folder = save("vit", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = archs
    (folder / "config.json").write_text(json.dumps(cfg))
    _refused(folder, match)


def test_a_model_whose_attention_bypasses_the_interface_is_refused(tmp_path, monkeypatch):
    """As a transformers release whose attention modules no longer call AttentionInterface would."""
    folder = save("vit", tmp_path)
    monkeypatch.setattr(capture_module, "attend", lambda *args: None)  # nothing reaches the capture
    _refused(folder, r"blocks \[0, 1, 2\] of ViTForImageClassification does not go through .*AttentionInterface")


def test_without_transformers_the_model_is_refused_with_the_install_command(tmp_path, monkeypatch):
    folder = save("vit", tmp_path)
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    _refused(folder, r"transformers package is not installed.*pip install '\.\[transformers\]'")


# -- the adapter: the attention the model used, against the float64 reference --------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_the_adapter_captures_the_attention_the_model_applies(hf_models_, family):
    """Kept whole and taken image by image, the captured attention is softmax(q k^T * scale + bias) as the
    reference computes it in float64 (BEiT's relative position bias included), and capturing changes
    no logit."""
    import copy

    m = copy.deepcopy(hf_models_[family])
    a = adapters.describe(m)
    capture_module.install(a)
    r = ref.HFReference(m)
    x = inputs(3, size_of(family), seed=1)
    layers = frozenset(range(len(a.blocks)))
    with torch.no_grad():
        plain = m(x)
        with capture_module.capture(attn_layers=layers, qk_layers=layers) as kept:
            logits = m(x)
        taken: dict = {}
        with capture_module.capture(attn_layers=layers, take=lambda b, rows, t: taken.setdefault(b, []).append(t)):
            m(x)
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)
    for i in range(3):
        c = r.run(x[i])
        torch.testing.assert_close(logits[i].double(), c.logits, atol=1e-4, rtol=0)
        for b in layers:
            torch.testing.assert_close(kept.attn[b][i].double(), c.attn[b], atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.cat(taken[b])[i].double(), c.attn[b], atol=1e-5, rtol=0)
            torch.testing.assert_close(kept.q[b][i].double(), c.q[b], atol=1e-5, rtol=0)
            torch.testing.assert_close(kept.k[b][i].double(), c.k[b], atol=1e-5, rtol=0)


def test_a_copied_folder_loads_the_same_model(hf_dirs, tmp_path):
    """The folder is all there is: a copy elsewhere loads to the same logits."""
    copy_dir = tmp_path / "copy"
    shutil.copytree(hf_dirs["beit"], copy_dir)
    a = models.create(models.ModelSpec.parse(f"transformers:{hf_dirs['beit']}"))
    b = models.create(models.ModelSpec.parse(f"transformers:{copy_dir}"))
    x = inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


def test_the_pool_serves_the_others_when_transformers_models_cannot_load(hf_dirs, model_dirs, tmp_path,
                                                                          monkeypatch):
    """Each refusal makes that model unavailable with its reason; the timm model beside them is served."""
    import asyncio
    import sys

    from service.pool import ModelPool

    swin = tmp_path / "swin"
    shutil.copytree(hf_dirs["vit"], swin)
    cfg = json.loads((swin / "config.json").read_text())
    (swin / "config.json").write_text(json.dumps({**cfg, "architectures": ["SwinForImageClassification"]}))
    specs = [models.ModelSpec.parse(s) for s in (
        f"swin=transformers:{swin}", f"empty=transformers:{tmp_path}",
        f"deit=local-dir:{model_dirs['vit_small_patch32_224']}",
    )]
    pool = ModelPool(specs, [torch.device("cpu")])
    asyncio.run(pool.load_all())
    status = {n: (m.status, m.reason) for n, m in pool.models.items()}
    assert status["deit"][0] == "ready" and pool.default.name == "deit"
    assert status["swin"][0] == "unavailable"
    assert "no attention adapter for SwinForImageClassification" in status["swin"][1]
    assert status["empty"][0] == "unavailable" and "no config.json" in status["empty"][1]
    monkeypatch.setitem(sys.modules, "transformers", None)
    pool = ModelPool([models.ModelSpec.parse(f"vit=transformers:{hf_dirs['vit']}")], [torch.device("cpu")])
    asyncio.run(pool.load_all())
    vit = pool.models["vit"]
    assert vit.status == "unavailable" and "pip install '.[transformers]'" in vit.reason


def test_a_hub_id_offline_and_not_cached_is_unavailable_with_the_reason(tmp_path, monkeypatch):
    import asyncio

    from service.pool import ModelPool

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    pool = ModelPool([models.ModelSpec.parse("transformers:nobody/no-such-vit")], [torch.device("cpu")])
    asyncio.run(pool.load_all())
    m = pool.models["no-such-vit"]
    assert m.status == "unavailable" and "not in the local Hugging Face cache" in m.reason, m.reason


# -- every method through the engine, against the reference --------------------------------------------
def _job(name, **kw):
    from service.methods import job

    return job(name, **kw)


RATIOS = [0.0, 0.5, 0.9]
FUSIONS = ["mean", "max", "min"]


def tol(ratio: float, grad: bool = False) -> float:
    return 1e-4 if ratio == 0 else (5e-3 if grad else 3e-3)


@pytest.fixture(scope="module")
def setups(hf_models_):
    """Per family: a CPU Engine, the float64 HFReference of the same weights, 3 inputs."""
    import copy

    from service.engine.engine import Engine

    return {f: (Engine(copy.deepcopy(m), torch.device("cpu"), name=f), ref.HFReference(m),
                inputs(3, size_of(f), seed=2))
            for f, m in hf_models_.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_rollout_and_layer_attention_match_the_reference(setups, family):
    engine, r, x = setups[family]
    assert (engine.shape.prefix, engine.shape.grid, engine.shape.pooling) == \
        (PREFIX[family], grid_of(family), "avg" if family == "beit" else "token")
    for fusion in FUSIONS:
        jobs = [_job("rollout", head_fusion=fusion, discard_ratio=ratio, start_layer=s)
                for ratio, s in zip(RATIOS, (0, 1, 0))]
        for i, (j, res) in enumerate(zip(jobs, engine.run(x, jobs))):
            want = r.rollout(r.run(x[i]), fusion, j.params.discard_ratio, j.params.start_layer)
            np.testing.assert_allclose(res.maps, want, atol=tol(j.params.discard_ratio), rtol=0)
    heads = [0, 1, "mean", "max", "min"]
    c0 = r.run(x[0])
    for h, res in zip(heads, engine.run(x[[0] * len(heads)], [_job("attention", head=h) for h in heads])):
        np.testing.assert_allclose(res.maps, r.attention(c0, h), atol=1e-4, rtol=0)
    qks = [_job("qk", layer=0, head=0, channel=0, which="q"), _job("qk", layer=2, head=1, channel=15, which="k")]
    for j, res in zip(qks, engine.run(x[[1, 1]], qks)):
        p = j.params
        np.testing.assert_allclose(res.maps, r.qk(r.run(x[1]), p.layer, p.head, p.channel, p.which), atol=1e-4)
    (res,) = engine.run(x[2:3], [_job("predict")])
    want = r.predictions(r.run(x[2]))
    assert [p.class_id for p in res.predictions] == [c for c, _ in want]
    np.testing.assert_allclose([p.score for p in res.predictions], [s for _, s in want], rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_methods_match_the_reference(setups, family):
    """Gradient rollout and GAE differentiate the model's output logit: for a DeiT with teacher, the mean of
    its two heads."""
    engine, r, x = setups[family]
    cats = [0, 3, 4]
    captured = [r.run(x[i], category=c) for i, c in enumerate(cats)]
    for fusion in FUSIONS:
        jobs = [_job("grad-rollout", category_id=c, head_fusion=fusion, discard_ratio=ratio)
                for c, ratio in zip(cats, RATIOS)]
        for i, (j, res) in enumerate(zip(jobs, engine.run(x, jobs))):
            want = r.grad_rollout(captured[i], fusion, j.params.discard_ratio)
            np.testing.assert_allclose(res.maps, want, atol=tol(j.params.discard_ratio, grad=True), rtol=0)
    jobs = [_job("gae", category_id=c, start_layer=s) for c, s in zip(cats, (0, 1, 2))]
    for i, (j, res) in enumerate(zip(jobs, engine.run(x, jobs))):
        np.testing.assert_allclose(res.maps, r.gae(captured[i], j.params.start_layer), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_timm_families_cases_match_the_reference_in_one_mixed_batch_and_compare(setups, family):
    """The very cases tests/test_families.py proves on every timm family (every method with fusions, ratios
    and start layers that reach every part of the definition; the sweeps; /compare's settings), in one batch
    that mixes both passes, and alone."""
    from service.methods import compare as cmp
    from tests import families
    from tests.test_families import Want, cases

    engine, r, x = setups[family]
    w = Want(r, x)
    todo = cases(r, w)
    assert {c[0] for c in todo} | {"compare", "predict"} == set(families.METHODS)
    together = engine.run(x[[c[2] for c in todo]], [c[1] for c in todo])
    for (name, j, _, want, atol), got in zip(todo, together):
        np.testing.assert_allclose(got.maps, want(), atol=atol, rtol=0, err_msg=f"{family} {name} {j.params}")
    for name, j, i, want, atol in todo[::3]:
        (got,) = engine.run(x[i : i + 1], [j])
        np.testing.assert_allclose(got.maps, want(), atol=atol, rtol=0, err_msg=f"{family} {name} alone")
    settings = cmp.validate([("rollout", {"head_fusion": "mean", "discard_ratio": 0.0}), ("gae", {"category_id": 4}),
                             ("grad-rollout", {"category_id": 4, "discard_ratio": 0.0})], engine.shape)
    jobs = cmp.plan(settings, engine.shape, 2, "mean", "most")
    results = engine.run(x[[0] * len(jobs)], [j for j, _ in jobs])
    got = cmp.answer("m", engine.shape, settings, jobs, results, "most")["results"]
    for g, want in zip(got, [r.rollout(w(0), "mean", 0.0), r.gae(w(0, 4)), r.grad_rollout(w(0, 4), "mean", 0.0)]):
        np.testing.assert_allclose(np.asarray(g["mask"]), want, atol=1e-4, rtol=0, err_msg=g["method"])


MIXED = [
    ("rollout", dict(head_fusion="max", discard_ratio=0.9)), ("grad-rollout", dict(category_id=3)),
    ("attention", dict(head="mean")), ("qk", dict(layer=2, head=1, channel=10, which="k")),
    ("gae", dict(category_id=1)), ("rollout", dict(head_fusion="mean", discard_ratio=0.0)), ("predict", {}),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_mixed_batch_answers_each_image_as_alone(setups, family):
    engine, _, _ = setups[family]
    jobs = [_job(n, **kw) for n, kw in MIXED]
    x = inputs(len(jobs), size_of(family), seed=5)
    together = engine.run(x, jobs)
    for i, j in enumerate(jobs):
        (alone,) = engine.run(x[i : i + 1], [j])
        if alone.maps is not None:
            np.testing.assert_allclose(together[i].maps, alone.maps, atol=1e-5, rtol=0)
        assert [p.class_id for p in together[i].predictions] == [p.class_id for p in alone.predictions]


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_maximization_steps_follow_the_reference_gradient(setups, family):
    """The long method's objective and its gradient w.r.t. the pixels, for a class, a block's feature
    channel and a head's q channel."""
    engine, r, _ = setups[family]
    for name, kw in (("class", dict(category_id=2)), ("features", dict(layer=1, channel=3)),
                     ("q", dict(layer=2, head=1, channel=4))):
        pixels = torch.rand(1, 3, *size_of(family), generator=torch.Generator().manual_seed(3))
        j = _job("activation-max", target=name, steps=1, **kw)
        value, grad = engine._input_gradient(pixels, [j])
        want_value, want_grad = r.unit(pixels[0], name, **{"category_id": 0, "layer": 0, "head": 0, "channel": 0,
                                                           **kw})
        assert float(value[0]) == pytest.approx(want_value, rel=1e-4, abs=1e-4)
        scale = float(want_grad.abs().max())
        assert scale > 0
        torch.testing.assert_close(grad[0].double(), want_grad, atol=1e-3 * scale, rtol=1e-3)


def _vit_from_timm(t: torch.nn.Module, depth: int) -> torch.nn.Module:
    """A transformers ViT with the weights of the timm ViT t (qkv split into q, k, v)."""
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=depth, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=5, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True))
    src = t.state_dict()
    sd = {"vit.embeddings.cls_token": src["cls_token"], "vit.embeddings.position_embeddings": src["pos_embed"],
          "vit.embeddings.patch_embeddings.projection.weight": src["patch_embed.proj.weight"],
          "vit.embeddings.patch_embeddings.projection.bias": src["patch_embed.proj.bias"],
          "vit.layernorm.weight": src["norm.weight"], "vit.layernorm.bias": src["norm.bias"],
          "classifier.weight": src["head.weight"], "classifier.bias": src["head.bias"]}
    for i in range(depth):
        b, h = f"blocks.{i}.", f"vit.layers.{i}."
        for part in ("weight", "bias"):
            q, k, v = src[b + f"attn.qkv.{part}"].chunk(3)
            sd |= {h + f"attention.q_proj.{part}": q, h + f"attention.k_proj.{part}": k,
                   h + f"attention.v_proj.{part}": v, h + f"attention.o_proj.{part}": src[b + f"attn.proj.{part}"],
                   h + f"layernorm_before.{part}": src[b + f"norm1.{part}"],
                   h + f"layernorm_after.{part}": src[b + f"norm2.{part}"],
                   h + f"mlp.fc1.{part}": src[b + f"mlp.fc1.{part}"], h + f"mlp.fc2.{part}": src[b + f"mlp.fc2.{part}"]}
    hf.load_state_dict(sd, strict=True)
    return hf.eval()


def test_a_transformers_vit_with_a_timm_vits_weights_gives_the_timm_maps(tmp_path):
    import timm

    from service.engine.engine import Engine

    torch.manual_seed(11)
    t = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                          depth=3, num_heads=2, mlp_ratio=2, num_classes=5).eval()
    _randomise(t, 11)
    folder = tmp_path / "vit"
    _vit_from_timm(t, 3).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    hf = models.create(models.ModelSpec.parse(f"transformers:{folder}"))
    a, b = Engine(t, torch.device("cpu")), Engine(hf, torch.device("cpu"))
    assert (a.shape.grid, a.shape.prefix, a.shape.mean, a.shape.std) == \
        (b.shape.grid, b.shape.prefix, b.shape.mean, b.shape.std)
    jobs = [_job(n, **kw) for n, kw in MIXED]
    x = inputs(len(jobs), seed=7)
    for ra, rb in zip(a.run(x, jobs), b.run(x, jobs)):
        if ra.maps is not None:
            np.testing.assert_allclose(rb.maps, ra.maps, atol=1e-4, rtol=0)
        np.testing.assert_allclose([p.score for p in rb.predictions], [p.score for p in ra.predictions], atol=1e-5)


# -- every door: HTTP, the Python client, the command line -----------------------------------------------
@pytest.mark.slow
def test_a_transformers_model_through_http_the_client_and_the_cli(hf_dirs, hf_models_, model_dirs, tmp_path,
                                                                   capsys):
    """A pool of two transformers models, a timm model and a refused one: each served model answers its
    reference's maps by HTTP, the client and the CLI (through the server and in process); /models tells
    each one's source, family, grid, prefix tokens and pooling, and the refused one's reason."""
    import httpx
    from PIL import Image

    from service.cli import explain as cli
    from service.client import Client
    from tests.conftest import png_bytes
    from tests.server import running_server

    remote = tmp_path / "remote"
    shutil.copytree(hf_dirs["vit"], remote)
    cfg = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "x.Y"}}))
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(img))
    pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1).double() / 255  # at the input size: no resize
    refs = {f: ref.HFReference(hf_models_[f]) for f in ("vit", "beit")}
    # ViTImageProcessor's mean and std: 0.5
    cs = {f: r.run((pixels - 0.5) / 0.5, category=2) for f, r in refs.items()}
    args = ["--model", f"vit=transformers:{hf_dirs['vit']}", "--model", f"beit=transformers:{hf_dirs['beit']}",
            "--model", f"deit=local-dir:{model_dirs['deit_tiny_patch16_224']}",
            "--model", f"remote=transformers:{remote}", "--max-delay-ms", "20"]
    with running_server(args) as s, httpx.Client(base_url=s.url, timeout=120) as http:
        listed = {m["name"]: m for m in http.get("/models").json()}
        assert listed["remote"]["status"] == "unavailable" and "auto_map" in listed["remote"]["reason"]
        assert listed["vit"]["status"] == listed["beit"]["status"] == listed["deit"]["status"] == "ready"
        assert [listed["beit"][k] for k in ("source", "family", "grid", "prefix_tokens", "pooling")] == \
            ["transformers", "BeitForImageClassification", [4, 4], 1, "avg"]
        assert [listed["vit"][k] for k in ("source", "pooling")] == ["transformers", "token"]
        for f in ("vit", "beit"):
            r, c = refs[f], cs[f]
            got = http.post("/rollout", files={"image": ("a.png", path.read_bytes(), "image/png")},
                            data={"model": f, "format": "json", "head_fusion": "mean", "discard_ratio": "0"})
            assert got.status_code == 200, got.text
            np.testing.assert_allclose(got.json()["mask"], r.rollout(c, "mean", 0.0), atol=1e-4)
            with Client(s.url) as client:
                np.testing.assert_allclose(client.gae(np.asarray(img), category_id=2, model=f).mask, r.gae(c),
                                           atol=1e-4)
                np.testing.assert_allclose(client.attention(path, head="max", model=f).layers, r.attention(c, "max"),
                                           atol=1e-4)
            out = tmp_path / f"{f}.json"
            assert cli.main([str(path), "--method", "grad-rollout", "--category-id", "2", "--discard-ratio", "0",
                             "--server", s.url, "--model", f, "-o", str(out), "--format", "json", "--quiet"]) == 0
            np.testing.assert_allclose(json.loads(out.read_text())["mask"], r.grad_rollout(c, "mean", 0.0), atol=1e-4)
            local = tmp_path / f"{f}-local.json"
            assert cli.main([str(path), "--method", "grad-rollout", "--category-id", "2", "--discard-ratio", "0",
                             "--model", f"{f}=transformers:{hf_dirs[f]}", "-o", str(local), "--format", "json",
                             "--quiet"]) == 0
            np.testing.assert_allclose(json.loads(local.read_text())["mask"], r.grad_rollout(c, "mean", 0.0),
                                       atol=1e-4)


# -- the coverage table of docs/models.md ------------------------------------------------------------------
# what each family is, for the table; every cell is proven by the tests above (the timm families' cases, compare,
# predict, and activation maximization's objective and gradient)
WHAT = {
    "vit": "ViT", "deit-teacher": "DeiT with distillation token and teacher head", "deit": "DeiT",
    "beit": "BEiT (relative position bias, patch mean)", "dinov2": "DINOv2",
    "dinov2-reg": "DINOv2 with 4 register tokens", "vit-tall": "ViT, non-square input (48 x 32 px, 6 x 4 grid)",
}


def coverage_table() -> str:
    from tests import families

    methods = (*families.METHODS, "activation-max")
    head = "| family | transformers class (tested small) | " + " | ".join(f"`{m}`" for m in methods) + " |"
    rule = "|---|---|" + "---|" * len(methods)
    rows = [f"| {WHAT[f]} | `{cls}` | " + " | ".join("yes" for _ in methods) + " |"
            for f, (cls, _, _) in FAMILIES.items()]
    return "\n".join([head, rule, *rows])


def test_the_transformers_coverage_table_in_the_docs_is_the_one_these_tests_prove():
    assert set(WHAT) == set(FAMILIES)
    docs = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    assert coverage_table() in docs, "docs/models.md: paste the output of `python -m tests.test_transformers_models`"


if __name__ == "__main__":
    print(coverage_table())

