"""The HTTP contract, end to end: a real `python -m service serve` process, real uploads."""

from __future__ import annotations

import io
import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests import reference as ref
from tests.conftest import ARCHS, png_bytes, smooth_image
from tests.server import running_server

ALIASES = {"deit_tiny_patch16_224": "deit", "deit_tiny_distilled_patch16_224": "distilled",
           "vit_small_patch32_224": "s32"}


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    args = ["--max-delay-ms", "30", "--max-batch-size", "8"]
    for arch in ARCHS:
        args += ["--model", f"{ALIASES[arch]}=local-dir:{model_dirs[arch]}"]
    args += ["--model", f"missing=local-dir:{tmp_path_factory.mktemp('empty')}"]
    with running_server(args) as s:
        yield s.url


@pytest.fixture(scope="module")
def refs(models):
    return {ALIASES[a]: ref.Reference(m) for a, m in models.items()}


def post(client, path, img: Image.Image | bytes, **fields):
    data = img if isinstance(img, bytes) else png_bytes(img)
    return client.post(path, files={"image": ("x.png", data, "image/png")}, data={k: str(v) for k, v in fields.items()})


def _ref_input(r: ref.Reference, img: Image.Image):
    return ref.preprocess(img, r.model)


# -- metadata ------------------------------------------------------------------------------------
def test_models_lists_every_model_with_status(client):
    got = {m["name"]: m for m in client.get("/models").json()}
    assert got["deit"]["grid"] == [14, 14] and got["deit"]["prefix_tokens"] == 1 and got["deit"]["default"]
    assert got["distilled"]["prefix_tokens"] == 2
    assert got["s32"]["grid"] == [7, 7] and got["s32"]["classes"] == 1000
    assert got["missing"]["status"] == "unavailable" and got["missing"]["reason"]
    assert all(got[a]["status"] == "ready" and got[a]["device"] == "cpu" for a in ("deit", "distilled", "s32"))


def test_health_ready_and_docs(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and isinstance(health["pid"], int) and set(health) == {"status", "pid"}
    assert client.get("/readyz").status_code == 200
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "/grad-rollout" in spec["paths"]
    body = spec["paths"]["/rollout"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    refs = set(re.findall(r'"\$ref": "([^"]+)"', json.dumps(spec)))
    known = {f"#/components/schemas/{name}" for name in spec["components"]["schemas"]}
    assert refs <= known, refs - known  # no dangling references in the published contract


# -- maps against the reference ------------------------------------------------------------------
@pytest.mark.parametrize("alias", ["deit", "distilled", "s32"])
def test_json_maps_match_reference(client, refs, alias):
    r = refs[alias]
    img = smooth_image(100)
    c = r.run(_ref_input(r, img))
    body = post(client, "/rollout", img, model=alias, format="json").json()
    assert body["method"] == "rollout"
    assert body["params"] == {"head_fusion": "max", "discard_ratio": 0.9, "start_layer": 0}
    assert body["grid"] == list(r.grid) and body["model"] == alias
    np.testing.assert_allclose(body["mask"], r.rollout(c, "max", 0.9), atol=3e-3)
    assert [p["class_id"] for p in body["predictions"]] == [i for i, _ in r.predictions(c)]
    assert all(isinstance(p["label"], str) and p["label"] for p in body["predictions"])

    body = post(client, "/rollout", img, model=alias, format="json", head_fusion="mean", discard_ratio=0).json()
    np.testing.assert_allclose(body["mask"], r.rollout(c, "mean", 0.0), atol=1e-4)

    body = post(client, "/attention", img, model=alias, format="json", head="min").json()
    np.testing.assert_allclose(body["layers"], r.attention(c, "min"), atol=1e-4)

    body = post(client, "/qk", img, model=alias, format="json", layer=3, head=1, channel=7, which="k").json()
    np.testing.assert_allclose(body["map"], r.qk(c, 3, 1, 7, "k"), atol=1e-4)

    cg = r.run(_ref_input(r, img), category=42)
    body = post(client, "/grad-rollout", img, model=alias, format="json", category_id=42).json()
    assert body["params"] == {"category_id": 42, "head_fusion": "mean", "discard_ratio": 0.9, "start_layer": 0}
    np.testing.assert_allclose(body["mask"], r.grad_rollout(cg, "mean", 0.9), atol=5e-3)


def test_concurrent_requests_with_mixed_parameters_each_get_their_own_answer(client, refs):
    r = refs["deit"]
    cases = []
    for i in range(16):
        img = smooth_image(200 + i)
        if i % 3 == 0:  # i = 0, 3, 6, 9, 12, 15: every fusion, and each with two ratios
            k = i // 3
            fields = dict(head_fusion=["mean", "max", "min"][k % 3], discard_ratio=[0.0, 0.5, 0.9][(k + k // 3) % 3])
            cases.append((img, "/rollout", fields))
        elif i % 3 == 1:
            cases.append((img, "/grad-rollout", dict(category_id=i * 37, head_fusion="max", discard_ratio=0.0)))
        else:
            cases.append((img, "/attention", dict(head=i % 3)))

    def call(case):
        img, path, fields = case
        with httpx.Client(base_url=str(client.base_url), timeout=120) as c:
            return post(c, path, img, model="deit", format="json", **fields)

    rollouts = {(f["head_fusion"], f["discard_ratio"]) for _, path, f in cases if path == "/rollout"}
    assert len(rollouts) == 6, rollouts  # the rollout requests really mix their parameters
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, cases))
    for (img, path, fields), resp in zip(cases, answers):
        assert resp.status_code == 200, resp.text
        body = resp.json()
        x = _ref_input(r, img)
        if path == "/rollout":
            want, atol = r.rollout(r.run(x), fields["head_fusion"], fields["discard_ratio"]), 3e-3
            got = body["mask"]
        elif path == "/grad-rollout":
            want, atol = r.grad_rollout(r.run(x, fields["category_id"]), "max", 0.0), 1e-4
            got = body["mask"]
        else:
            want, atol, got = r.attention(r.run(x), fields["head"]), 1e-4, body["layers"]
        np.testing.assert_allclose(got, want, atol=atol)


# -- PNG answers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path, fields, mode", [
    ("/rollout", {}, "RGB"), ("/grad-rollout", {"category_id": 5}, "RGB"), ("/qk", {"layer": 2}, "L"),
])
def test_png_answers_have_the_uploads_size(client, path, fields, mode):
    img = smooth_image(7, size=(301, 173))
    resp = post(client, path, img, **fields)
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    out = Image.open(io.BytesIO(resp.content))
    assert out.size == (301, 173) and out.mode == mode
    assert int(resp.headers["x-predicted-class"]) >= 0 and resp.headers["x-predicted-label"]


def test_attention_png_is_a_montage_of_every_layer(client, refs):
    """Tile l (row-major, 4 x 3 for 12 blocks, 4 white pixels between) is the heatmap of block l's
    class-token attention (head 1, divided by its max) over the 224 x 224 upload."""
    img = smooth_image(8)
    resp = post(client, "/attention", img, model="deit", head=1)
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    out = Image.open(io.BytesIO(resp.content))
    assert out.size == (4 * 224 + 3 * 4, 3 * 224 + 2 * 4) and out.mode == "RGB"
    got = np.asarray(out, np.float64)
    r = refs["deit"]
    want = ref.montage(img, r.attention(r.run(_ref_input(r, img)), 1))
    assert got.shape == want.shape
    tiles = [np.s_[r * 228 : r * 228 + 224, c * 228 : c * 228 + 224] for r, c in (divmod(i, 4) for i in range(12))]
    for layer, tile in enumerate(tiles):
        diff = np.abs(got[tile] - want[tile])
        # truncation to uint8 (below one level) and, where a value lies on a step of the jet table
        # (float32 against float64), one step of it: at most 4 levels, plus the truncation
        assert diff.mean() < 0.6 and np.percentile(diff, 99.9) <= 1.01 and diff.max() <= 5, (layer, diff.mean())
    gaps = np.ones(got.shape[:2], bool)
    for tile in tiles:
        gaps[tile] = False
    assert (got[gaps] == 255).all()


def test_predict(client, refs):
    img = smooth_image(9)
    body = post(client, "/predict", img, model="s32").json()
    r = refs["s32"]
    want = r.predictions(r.run(_ref_input(r, img)))
    assert [p["class_id"] for p in body["predictions"]] == [i for i, _ in want]
    np.testing.assert_allclose([p["score"] for p in body["predictions"]], [s for _, s in want], rtol=1e-4)


# -- client mistakes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path, fields, status, needle", [
    ("/rollout", {"model": "nope"}, 404, "unknown model"),
    ("/rollout", {"model": "missing"}, 503, "unavailable"),
    ("/rollout", {"discard_ratio": 1.0}, 422, "discard_ratio"),
    ("/rollout", {"discard_ratio": "abc"}, 422, "discard_ratio"),
    ("/rollout", {"head_fusion": "median"}, 422, "head_fusion"),
    ("/rollout", {"format": "gif"}, 422, "format"),
    ("/rollout", {"discard-ratio": 0.5}, 422, "discard-ratio"),
    ("/grad-rollout", {}, 422, "category_id"),
    ("/grad-rollout", {"category_id": 1000}, 422, "category_id"),
    ("/grad-rollout", {"category_id": -1}, 422, "category_id"),
    ("/attention", {"head": 3}, 422, "head"),
    ("/attention", {"head": "avg"}, 422, "head"),
    ("/qk", {"layer": 12}, 422, "layer"),
    ("/qk", {"channel": 64}, 422, "channel"),
    ("/qk", {"which": "v"}, 422, "which"),
])
def test_bad_parameters_get_clear_json_errors(client, path, fields, status, needle):
    resp = post(client, path, smooth_image(1), **fields)
    assert resp.status_code == status, resp.text
    assert needle in str(resp.json()["detail"])


@pytest.mark.parametrize("data", [b"", b"hello, I am text", png_bytes(smooth_image(2))[:200]])
def test_undecodable_images_get_422(client, data):
    resp = post(client, "/rollout", data)
    assert resp.status_code == 422 and resp.json()["detail"]


def test_missing_image_gets_422(client):
    resp = client.post("/rollout", files={"format": (None, "json")})
    assert resp.status_code == 422 and "image" in str(resp.json()["detail"])


def test_a_body_that_cannot_carry_an_image_gets_415(client):
    resp = client.post("/rollout", data={"format": "json"})
    assert resp.status_code == 415 and "multipart/form-data" in resp.json()["detail"]


# -- the method registry and the newer methods -------------------------------------------------------
def test_methods_lists_every_endpoint_with_its_parameters(client):
    methods = {m["name"]: m for m in client.get("/methods").json()}
    assert {"rollout", "grad-rollout", "gae", "attention", "qk", "rollout-sweep", "grad-rollout-sweep",
            "activation-max", "predict"} <= set(methods)
    spec = client.get("/openapi.json").json()
    for m in methods.values():
        assert m["path"] in spec["paths"]
    rollout = {p["name"]: p for p in methods["rollout"]["params"]}
    assert rollout["discard_ratio"]["default"] == 0.9 and rollout["discard_ratio"]["exclusive_maximum"] == 1
    assert rollout["head_fusion"]["enum"] == ["mean", "max", "min"] and rollout["start_layer"]["below"] == "layers"
    assert methods["rollout"]["formats"] == ["png", "jpeg", "webp", "json"]
    assert methods["rollout-sweep"]["formats"] == ["gif", "apng", "json"]
    assert methods["activation-max"]["image"] == "optional"
    assert {p["name"]: p for p in methods["gae"]["params"]}["category_id"]["required"]


def test_gae_and_start_layer_match_reference(client, refs):
    r = refs["distilled"]
    img = smooth_image(110)
    c = r.run(_ref_input(r, img), category=77)
    body = post(client, "/gae", img, model="distilled", format="json", category_id=77, start_layer=2).json()
    assert body["method"] == "gae" and body["params"] == {"category_id": 77, "start_layer": 2}
    np.testing.assert_allclose(body["mask"], r.gae(c, 2), atol=1e-4)
    body = post(client, "/rollout", img, model="distilled", format="json", discard_ratio=0, start_layer=3).json()
    np.testing.assert_allclose(body["mask"], r.rollout(c, "max", 0.0, 3), atol=1e-4)
    resp = post(client, "/gae", img, model="distilled", category_id=77)
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    assert post(client, "/gae", img, model="distilled", category_id=77, start_layer=12).status_code == 422


def test_a_sweep_equals_single_requests_at_its_ratios(client):
    img = smooth_image(111)
    body = post(client, "/rollout/sweep", img, model="deit", format="json", discard_ratios="0,0.5,0.9").json()
    assert body["discard_ratios"] == [0.0, 0.5, 0.9] and body["method"] == "rollout" and len(body["masks"]) == 3
    for ratio, mask in zip(body["discard_ratios"], body["masks"]):
        single = post(client, "/rollout", img, model="deit", format="json", discard_ratio=ratio).json()["mask"]
        np.testing.assert_allclose(mask, single, atol=1e-6)
    data = {"image": __import__("base64").b64encode(png_bytes(img)).decode(), "category_id": 3,
            "discard_ratios": [0.2, 0.8], "format": "json", "model": "deit"}
    body = client.post("/grad-rollout/sweep", json=data).json()
    single = post(client, "/grad-rollout", img, model="deit", format="json", category_id=3, discard_ratio=0.8).json()
    np.testing.assert_allclose(body["masks"][1], single["mask"], atol=1e-6)
    resp = post(client, "/rollout/sweep", smooth_image(112, size=(120, 90)), discard_ratios="0,0.9", frame_ms=200)
    anim = Image.open(io.BytesIO(resp.content))
    assert resp.headers["content-type"] == "image/gif" and anim.n_frames == 2 and anim.size == (120, 90)
    resp = post(client, "/rollout/sweep", img, discard_ratios="0,1")
    assert resp.status_code == 422 and "discard_ratios" in str(resp.json()["detail"])


def _max_fields(**kw):
    return {"model": "s32", "target": "class", "category_id": 5, "steps": 4, "seed": 3, **kw}


def test_activation_max_answers_json_png_and_a_seed_reproduces_it(client):
    first = client.post("/activation-max", json={**_max_fields(param="pixel"), "format": "json"}).json()
    again = client.post("/activation-max", json={**_max_fields(param="pixel"), "format": "json"}).json()
    assert len(first["objective"]) == 4 and first["objective"][-1] > first["objective"][0]
    assert first["image"] == again["image"] and first["params"]["seed"] == 3
    fourier = client.post("/activation-max", json={**_max_fields(copies=2), "format": "json"}).json()
    assert fourier["params"]["param"] == "fourier" and len(fourier["objective"]) == 4
    assert fourier["final_objective"] is not None and fourier["start_objective"] is not None
    assert "robustness" in fourier
    img = Image.open(io.BytesIO(__import__("base64").b64decode(first["image"])))
    assert img.size == (224, 224) and img.mode == "RGB"
    resp = client.post("/activation-max", data={k: str(v) for k, v in _max_fields().items()},
                       files={"image": ("x.png", png_bytes(smooth_image(5)), "image/png")})
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(resp.content)).size == (224, 224)
    resp = client.post("/activation-max", json=_max_fields(target="q", channel=64))
    assert resp.status_code == 422 and "channel" in resp.json()["detail"]


def test_activation_max_streams_progress_as_server_sent_events(client):
    events = []
    with client.stream("POST", "/activation-max", json=_max_fields(steps=3),
                       headers={"Accept": "text/event-stream"}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in resp.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((event, json.loads(line.removeprefix("data: "))))
    # a progress event per step, then the robustness pass's, then the answer
    assert [e for e, _ in events] == ["progress"] * 4 + ["result"]
    assert [d["step"] for _, d in events[:4]] == [0, 1, 2, 3] and {d["total"] for _, d in events[:4]} == {4}
    assert events[-1][1]["objective"] == [d["objective"] for _, d in events[:3]]
    assert events[-1][1]["final_objective"] == events[3][1]["objective"]
