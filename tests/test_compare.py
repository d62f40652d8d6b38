"""Faithfulness through every door (HTTP bodies, headers, the client, the CLI) and POST /compare."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from timm.models import save_for_hf

from service.cli import compare as cli_compare
from service.cli import explain as cli
from service.client import Client, ServiceError
from tests import reference as ref
from tests.conftest import png_bytes, smooth_image
from tests.server import running_server
from tests.test_faithfulness import sharpen

SETTINGS = [
    {"method": "rollout", "params": {"head_fusion": "max", "discard_ratio": 0.9}},
    {"method": "rollout", "params": {"head_fusion": "min", "discard_ratio": 0.9, "start_layer": 2}},
    {"method": "grad-rollout", "params": {"category_id": 7}},
    {"method": "gae", "params": {"category_id": 7}},
    {"method": "grad-rollout", "params": {"category_id": 11, "head_fusion": "max", "discard_ratio": 0.5}},
]


@pytest.fixture(scope="module")
def sharp_model(models):
    return sharpen(models["deit_tiny_patch16_224"])


@pytest.fixture(scope="module")
def server(sharp_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharp") / "deit"
    save_for_hf(sharp_model, str(folder), safe_serialization=True)
    with running_server(["--model", f"deit=local-dir:{folder}", "--max-delay-ms", "30", "--max-batch-size", "16"]) as s:
        yield s.url


@pytest.fixture(scope="module")
def r(sharp_model):
    return ref.Reference(sharp_model)


IMG = smooth_image(31)


def post(client, path, img=IMG, **fields):
    return client.post(path, files={"image": ("x.png", png_bytes(img), "image/png")},
                       data={k: str(v) for k, v in fields.items()})


def assert_curves(got: dict, want: ref.ReferenceCurves) -> None:
    np.testing.assert_allclose(got["deletion"], want.deletion, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["insertion"], want.insertion, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([got["deletion_auc"], got["insertion_auc"]], [want.deletion_auc, want.insertion_auc],
                               rtol=1e-4, atol=1e-6)


# -- the option on the explanation endpoints -------------------------------------------------------
def test_json_answers_carry_curves_equal_to_the_reference(client, r):
    x = ref.preprocess(IMG, r.model)
    got = post(client, "/grad-rollout", category_id=7, faithfulness="true", faithfulness_steps=3, removal="mean",
               format="json").json()
    f = got["faithfulness"]
    assert (f["class_id"], f["steps"], f["removal"], f["order"]) == (7, 3, "mean", "most")
    assert "faithfulness" not in got["params"] and "removal" not in got["params"]
    assert_curves(f, ref.faithfulness(r, x, np.array(got["mask"]), 7, 3, "mean"))
    b64 = base64.b64encode(png_bytes(IMG)).decode()
    body = client.post("/rollout", json={"image": b64, "faithfulness": True, "faithfulness_steps": 2,
                                         "order": "least", "format": "json"}).json()
    top = body["predictions"][0]["class_id"]
    assert body["faithfulness"]["class_id"] == top
    assert_curves(body["faithfulness"], ref.faithfulness(r, x, np.array(body["mask"]), top, 2, "blur", "least"))
    assert "faithfulness" not in post(client, "/rollout", format="json").json()


def test_png_answers_carry_the_areas_in_headers(client):
    js = post(client, "/gae", category_id=3, faithfulness="true", faithfulness_steps=3, format="json").json()
    png = post(client, "/gae", category_id=3, faithfulness="true", faithfulness_steps=3)
    assert png.headers["content-type"] == "image/png" and png.headers["x-faithfulness-class"] == "3"
    assert float(png.headers["x-deletion-auc"]) == pytest.approx(js["faithfulness"]["deletion_auc"], abs=2e-6)
    assert float(png.headers["x-insertion-auc"]) == pytest.approx(js["faithfulness"]["insertion_auc"], abs=2e-6)
    gif = post(client, "/rollout/sweep", discard_ratios="0,0.9", faithfulness="true", faithfulness_steps=2)
    sweep = post(client, "/rollout/sweep", discard_ratios="0,0.9", faithfulness="true", faithfulness_steps=2,
                 format="json").json()
    assert len(sweep["faithfulness"]) == 2
    assert [float(v) for v in gif.headers["x-deletion-auc"].split(",")] == pytest.approx(
        [f["deletion_auc"] for f in sweep["faithfulness"]], abs=2e-6)
    assert "x-deletion-auc" not in post(client, "/gae", category_id=3).headers


def test_sixteen_concurrent_requests_answer_as_alone(client):
    """Mixed methods, options and images, batched together by the server."""
    calls = []
    for i in range(16):
        fields = dict(format="json", faithfulness=str(i % 4 != 3).lower(), faithfulness_steps=2 + i % 3,
                      removal=("blur", "mean")[i % 2], order=("most", "least")[(i // 2) % 2])
        path, extra = [("/rollout", {}), ("/grad-rollout", {"category_id": i}), ("/gae", {"category_id": 1}),
                       ("/qk", {"layer": 1})][i % 4]
        if path == "/qk":
            fields = {"format": "json"}
        calls.append((path, smooth_image(40 + i % 5), {**fields, **extra}))
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda c: post(client, c[0], c[1], **c[2]).json(), calls))
    for (path, img, fields), got in zip(calls, together):
        alone = post(client, path, img, **fields).json()
        assert ("faithfulness" in got) == ("faithfulness" in alone) == (fields.get("faithfulness") == "true")
        if "faithfulness" in got:
            for key in ("deletion", "insertion"):
                np.testing.assert_allclose(got["faithfulness"][key], alone["faithfulness"][key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fields,name", [
    ({"faithfulness_steps": 0}, "faithfulness_steps"), ({"faithfulness_steps": 65}, "faithfulness_steps"),
    ({"removal": "noise"}, "removal"), ({"order": "middle"}, "order"), ({"faithfulness": "maybe"}, "faithfulness"),
])
def test_bad_options_are_422_naming_the_field(client, fields, name):
    resp = post(client, "/rollout", **{"faithfulness": "true", **fields})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", name]


@pytest.mark.parametrize("path,fields", [("/attention", {}), ("/qk", {}), ("/predict", {})])
def test_faithfulness_on_a_method_without_a_map_is_422(client, path, fields):
    resp = post(client, path, faithfulness="true", **fields)
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "faithfulness"]


# -- POST /compare ---------------------------------------------------------------------------------
def test_compare_equals_separate_requests_and_ranks_by_deletion_area(client):
    got = post(client, "/compare", settings=json.dumps(SETTINGS), faithfulness_steps=4).json()
    assert [x["method"] for x in got["results"]] == [s["method"] for s in SETTINGS]
    for s, res in zip(SETTINGS, got["results"]):
        alone = post(client, f"/{s['method']}", format="json", faithfulness="true", faithfulness_steps=4,
                     **s["params"]).json()
        assert res["params"] == alone["params"]
        np.testing.assert_allclose(res["mask"], alone["mask"], atol=1e-5)
        for key in ("deletion", "insertion"):
            np.testing.assert_allclose(res["faithfulness"][key], alone["faithfulness"][key], rtol=1e-4, atol=1e-6)
        assert res["faithfulness"]["class_id"] == s["params"].get("category_id", got["predictions"][0]["class_id"])
    areas = [res["faithfulness"]["deletion_auc"] for res in got["results"]]
    assert got["ranking"] == sorted(range(len(areas)), key=lambda i: (areas[i], i))
    assert len(set(areas)) > 1  # the settings really differ
    least = post(client, "/compare", settings=json.dumps(SETTINGS[:3]), faithfulness_steps=2, order="least",
                 removal="mean").json()
    areas = [res["faithfulness"]["deletion_auc"] for res in least["results"]]
    assert least["ranking"] == sorted(range(3), key=lambda i: (-areas[i], i))  # keeping the class longest is best
    assert {res["faithfulness"]["removal"] for res in least["results"]} == {"mean"}


def test_compare_takes_a_json_body(client, r):
    b64 = base64.b64encode(png_bytes(IMG)).decode()
    got = client.post("/compare", json={"image": b64, "settings": SETTINGS[2:4], "faithfulness_steps": 2}).json()
    assert [res["method"] for res in got["results"]] == ["grad-rollout", "gae"]
    x = ref.preprocess(IMG, r.model)
    res = got["results"][1]
    assert_curves(res["faithfulness"], ref.faithfulness(r, x, np.array(res["mask"]), 7, 2))


@pytest.mark.parametrize("settings,loc", [
    ([{"method": "qk"}], ["body", "settings", 0, "method"]),
    ([SETTINGS[0], {"method": "nope", "params": {}}], ["body", "settings", 1, "method"]),
    ([SETTINGS[0], {"method": "rollout", "params": {"head_fusion": "avg"}}],
     ["body", "settings", 1, "params", "head_fusion"]),
    ([{"method": "gae", "params": {"category_id": 1000}}], ["body", "settings", 0, "params", "category_id"]),
    ([{"method": "gae", "params": {}}], ["body", "settings", 0, "params", "category_id"]),
    ([{"method": "rollout", "params": {"faithfulness_steps": 3}}],
     ["body", "settings", 0, "params", "faithfulness_steps"]),
    ([{"method": "rollout", "params": {"model": "deit"}}], ["body", "settings", 0, "params", "model"]),
    ([{"method": "rollout", "extra": 1}], ["body", "settings", 0, "extra"]),
    ([SETTINGS[0]] * 9, ["body", "settings"]),
    ([], ["body", "settings"]),
    ("[not json", ["body", "settings"]),
    ("[" * 40, ["body", "settings"]),
])
def test_compare_refuses_bad_settings_naming_the_setting(client, settings, loc):
    raw = settings if isinstance(settings, str) else json.dumps(settings)
    resp = post(client, "/compare", settings=raw)
    assert resp.status_code == 422, resp.text
    assert loc in [e["loc"] for e in resp.json()["detail"]]


def test_compare_refuses_bad_options_and_missing_parts(client):
    ok = json.dumps(SETTINGS[:1])
    assert post(client, "/compare", settings=ok, faithfulness_steps=0).status_code == 422
    assert post(client, "/compare", settings=ok, removal="noise").status_code == 422
    assert post(client, "/compare", settings=ok, model="nope").status_code == 404
    assert client.post("/compare", files={"settings": (None, ok)}).status_code == 422  # no image
    assert client.post("/compare", json={"settings": SETTINGS[:1]}).status_code == 422
    two = [("image", ("a.png", png_bytes(IMG))), ("image", ("b.png", png_bytes(IMG)))]
    assert client.post("/compare", files=two, data={"settings": ok}).status_code == 422


# -- the client and the command line ---------------------------------------------------------------
def test_client_option_and_compare(server, tmp_path):
    with Client(server) as c:
        e = c.grad_rollout(IMG, category_id=7, faithfulness=True, faithfulness_steps=3, removal="mean")
        assert e.faithfulness["steps"] == 3 and len(e.faithfulness["deletion"]) == 4
        many = c.rollout([IMG, IMG], faithfulness=True, faithfulness_steps=2)
        assert all(one.faithfulness["deletion"] == many[0].faithfulness["deletion"] for one in many)
        cmp = c.compare(IMG, SETTINGS[:3], faithfulness_steps=2)
        assert [x["method"] for x in cmp.results] == ["rollout", "rollout", "grad-rollout"]
        assert cmp.masks.shape == (3, 14, 14) and sorted(cmp.ranking) == [0, 1, 2]
        with pytest.raises(ServiceError) as err:
            c.compare(IMG, [{"method": "qk"}])
        assert err.value.status == 422


def test_cli_compare_prints_the_ranking_and_explain_takes_the_option(server, tmp_path, capsys):
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(IMG))
    code = cli_compare.run([str(path), "--server", server, "--setting", "rollout", "--setting",
                    "grad-rollout category_id=7 head_fusion=max", "--setting", "gae category_id=7",
                    "--faithfulness-steps", "2", "-o", str(tmp_path / "cmp.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    saved = json.loads((tmp_path / "cmp.json").read_text())
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert lines[0].split()[:3] == ["rank", "setting", "deletion"]
    first = saved["results"][saved["ranking"][0]]
    assert f"{first['faithfulness']['deletion_auc']:.3f}" in lines[1] and "1" == lines[1].split()[0]
    assert len(lines) == 4
    assert cli_compare.run([str(path), "--server", server, "--setting", "qk"]) == cli.REFUSED
    assert cli_compare.run([str(path), "--server", server, "--setting", "gae category_id"]) == cli.USAGE
    code = cli.run([str(path), "--server", server, "--method", "gae", "--category-id", "7",
                    "--faithfulness", "--faithfulness-steps", "2", "-o", str(tmp_path / "g.json")])
    assert code == 0
    assert json.loads((tmp_path / "g.json").read_text())["faithfulness"]["steps"] == 2


def test_cli_compare_in_process_on_the_demo_model(tmp_path, capsys):
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(IMG))
    code = cli_compare.run([str(path), "--setting", "rollout", "--setting", "grad-rollout category_id=1",
                            "--faithfulness-steps", "2", "--removal", "mean", "-o", str(tmp_path / "c.json")])
    assert code == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["model"] == "shapes-vit" and len(lines) == 3 and sorted(saved["ranking"]) == [0, 1]
    assert cli_compare.run([str(path), "--setting", "gae category_id=99"]) == cli.REFUSED  # 8 classes
