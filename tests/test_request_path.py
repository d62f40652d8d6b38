"""The request path of issue 17 through HTTP: raw image bodies, pictures at max_side in png, jpeg
and webp, and large photographs decoded no larger than the answer needs.

The server runs the demo model (14 x 14 grid, 224 px input, bilinear). References come from the
definitions: the mask from the float64 reference model on the reference preprocessing, the overlay
from the heatmap's formula (docs/how-it-works.md) drawn over the upload resized to the answer's size."""

from __future__ import annotations

import io

import numpy as np
import pytest
import timm
from PIL import Image

from service import imaging
from service.config import SHAPES_VIT
from tests import reference as ref
from tests.conftest import jpeg_bytes, photo, png_bytes, smooth_image
from tests.server import running_server


@pytest.fixture(scope="module")
def server():
    with running_server(["--model", f"demo=local-dir:{SHAPES_VIT}", "--max-delay-ms", "5"]) as s:
        yield s.url


@pytest.fixture(scope="module")
def reference():
    return ref.Reference(timm.create_model(f"local-dir:{SHAPES_VIT}", pretrained=True).eval())


def raw(client, path, data: bytes, ctype="image/jpeg", **params):
    return client.post(path, content=data, headers={"Content-Type": ctype}, params=params)


def form(client, path, data: bytes, **fields):
    return client.post(path, files={"image": ("x", data, "application/octet-stream")},
                       data={k: str(v) for k, v in fields.items()})


# -- the raw body ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path, params", [("/rollout", {}), ("/grad-rollout", {"category_id": 3}),
                                          ("/gae", {"category_id": 1}), ("/attention", {"head": "max"}),
                                          ("/qk", {"layer": 1, "which": "k"}),
                                          ("/rollout/sweep", {"discard_ratios": "0,0.5"}), ("/predict", {})])
def test_a_raw_body_answers_exactly_as_multipart(client, path, params):
    data = jpeg_bytes(smooth_image(7))
    fmt = {} if path == "/predict" else {"format": "json"}
    a = raw(client, path, data, **params, **fmt)
    b = form(client, path, data, **params, **fmt)
    assert a.status_code == 200, a.text
    assert a.json() == b.json()


def test_a_raw_body_matches_the_reference(client, reference):
    img = smooth_image(8)
    body = raw(client, "/grad-rollout", png_bytes(img), ctype="image/png", category_id=2, format="json").json()
    want = reference.grad_rollout(reference.run(ref.preprocess(img, reference.model), category=2), "mean", 0.9)
    np.testing.assert_allclose(np.array(body["mask"]), want, atol=2e-4)


@pytest.mark.parametrize("params, ctype, data, status, needle", [
    ({"head_fusion": "avg"}, "image/jpeg", None, 422, "head_fusion"),
    ({"bogus": "1"}, "image/jpeg", None, 422, "bogus"),
    ({"image": "x"}, "image/jpeg", None, 422, "query parameter"),
    ({"max_side": "-1"}, "image/jpeg", None, 422, "max_side"),
    ({"max_side": "999999"}, "image/jpeg", None, 422, "max_side"),
    ({"format": "gif"}, "image/jpeg", None, 422, "format"),
    ({}, "image/jpeg", b"", 422, "image"),
    ({}, "image/jpeg", b"not an image at all", 422, "image"),
    ({}, "image/svg+xml", b"<svg xmlns='http://www.w3.org/2000/svg'/>", 415, "image/jpeg"),
    ({}, "image/x-icon", b"\0\0\1\0 not even an icon", 415, "JPEG"),
    ({}, "image/jpeg", "truncated", 422, "truncated"),
])
def test_raw_body_mistakes_get_clear_4xx(client, params, ctype, data, status, needle):
    if data is None:
        data = jpeg_bytes(smooth_image(9))
    elif data == "truncated":
        full = jpeg_bytes(photo((1600, 1200)))
        data = full[: len(full) // 2]
    resp = raw(client, "/rollout", data, ctype=ctype, **params)
    assert resp.status_code == status, resp.text
    assert needle in str(resp.json()["detail"])


def test_a_repeated_query_parameter_is_refused(client):
    resp = client.post("/rollout?format=json&format=png", content=jpeg_bytes(smooth_image(1)),
                       headers={"Content-Type": "image/jpeg"})
    assert resp.status_code == 422 and "more than once" in resp.json()["detail"]


def test_query_parameters_with_other_bodies_are_refused_not_ignored(client):
    resp = client.post("/rollout?discard_ratio=0.5", files={"image": ("x.png", png_bytes(smooth_image(1)))},
                       data={"format": "json"})
    assert resp.status_code == 422 and "query string" in resp.json()["detail"]


def test_a_raw_body_over_the_upload_limit_is_413(client):
    resp = raw(client, "/rollout", b"\xff\xd8" + b"\0" * (21 * 1024 * 1024))
    assert resp.status_code == 413


def test_openapi_describes_the_raw_body_and_its_query_parameters(client):
    op = client.get("/openapi.json").json()["paths"]["/rollout"]["post"]
    assert {"image/jpeg", "image/png", "image/webp"} <= set(op["requestBody"]["content"])
    assert {"discard_ratio", "max_side", "format"} <= {p["name"] for p in op["parameters"] if p["in"] == "query"}


# -- pictures at max_side, in png, jpeg and webp ----------------------------------------------------
def overlay_reference(canvas: Image.Image, mask: np.ndarray) -> np.ndarray:
    """The heatmap (docs/how-it-works.md): jet(bilinear mask) + image / 255, divided by its maximum, x 255."""
    w, h = canvas.size
    up = np.asarray(Image.fromarray(mask.astype(np.float32), "F").resize((w, h), Image.Resampling.BILINEAR))
    jet = imaging._lut("jet")[(np.clip(up, 0, 1) * 255).astype(np.uint8)]
    cam = jet + np.asarray(canvas, np.float32) / 255
    return cam / cam.max() * 255


@pytest.mark.parametrize("max_side, size", [(None, (1024, 683)), (0, (1920, 1280)), (300, (300, 200)),
                                            (5000, (1920, 1280))])
def test_picture_answers_are_drawn_at_max_side(client, max_side, size):
    data = jpeg_bytes(photo((1920, 1280), seed=11))
    params = {} if max_side is None else {"max_side": max_side}
    resp = raw(client, "/rollout", data, **params)
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    pic = Image.open(io.BytesIO(resp.content))
    assert pic.size == size
    mask = np.array(raw(client, "/rollout", data, format="json").json()["mask"])
    full = Image.open(io.BytesIO(data)).convert("RGB")
    want = overlay_reference(full.resize(size, Image.Resampling.BILINEAR), mask)
    diff = np.abs(np.asarray(pic, np.float64) - want)
    assert diff.mean() < 2.0, diff.mean()  # canvas resampled in steps, truncation: a level or two


@pytest.mark.parametrize("fmt, media, pil", [("jpeg", "image/jpeg", "JPEG"), ("webp", "image/webp", "WEBP"),
                                             ("png", "image/png", "PNG")])
@pytest.mark.parametrize("path, params", [("/rollout", {}), ("/grad-rollout", {"category_id": 0}),
                                          ("/gae", {"category_id": 0}), ("/attention", {})])
def test_overlays_and_montages_come_in_png_jpeg_and_webp(client, path, params, fmt, media, pil):
    data = jpeg_bytes(photo((800, 600), seed=12))
    resp = form(client, path, data, format=fmt, **params)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == media
    pic = Image.open(io.BytesIO(resp.content))
    assert pic.format == pil
    png = Image.open(io.BytesIO(form(client, path, data, format="png", **params).content))
    assert pic.size == png.size
    assert np.abs(np.asarray(pic.convert("RGB"), np.float64) - np.asarray(png, np.float64)).mean() < 6


def test_methods_list_the_new_formats_and_max_side(client):
    methods = {m["name"]: m for m in client.get("/methods").json()}
    assert methods["rollout"]["formats"] == ["png", "jpeg", "webp", "json"]
    assert methods["qk"]["formats"] == ["png", "json"]
    side = {p["name"]: p for p in methods["rollout"]["params"]}["max_side"]
    assert side["default"] == 1024 and side["minimum"] == 0


def test_qk_and_sweeps_draw_at_max_side(client):
    data = jpeg_bytes(photo((1600, 1200), seed=13))
    qk = raw(client, "/qk", data, max_side=400)
    assert Image.open(io.BytesIO(qk.content)).size == (400, 300)
    gif = raw(client, "/rollout/sweep", data, discard_ratios="0,0.9", max_side=200)
    frames = Image.open(io.BytesIO(gif.content))
    assert frames.size == (200, 150) and frames.n_frames == 2


# -- large photographs ----------------------------------------------------------------------------
def test_a_large_jpeg_map_stays_close_to_the_full_decode(client, reference):
    """A 4000 x 3000 JPEG is decoded at 1/4 scale; its mask against the reference's mask of the
    full decode resized in one step to the input size (the definition of the preprocessing)."""
    img = photo((4000, 3000), seed=14)
    data = jpeg_bytes(img)
    body = raw(client, "/rollout", data, format="json").json()
    full = Image.open(io.BytesIO(data)).convert("RGB")
    want = reference.rollout(reference.run(ref.preprocess(full, reference.model)), "max", 0.9)
    got = np.array(body["mask"])
    assert np.abs(got - want).max() < 0.05, np.abs(got - want).max()


def test_max_side_and_the_picture_formats_through_the_client_and_the_cli(server, tmp_path):
    from service.cli import explain as cli
    from service.client import Client

    data = jpeg_bytes(photo((1600, 1200), seed=15))
    with Client(server) as c:
        jpg = c.rollout(data, format="jpeg", max_side=400)  # one image: sent as a raw body
        webp = c.grad_rollout(data, category_id=1, format="webp", max_side=200)
    assert Image.open(io.BytesIO(jpg)).format == "JPEG" and Image.open(io.BytesIO(jpg)).size == (400, 300)
    assert Image.open(io.BytesIO(webp)).format == "WEBP" and Image.open(io.BytesIO(webp)).size == (200, 150)
    src = tmp_path / "photo.jpg"
    src.write_bytes(data)
    out = tmp_path / "out.jpg"  # the extension picks the format
    assert cli.main([str(src), "--method", "rollout", "--max-side", "320", "--server", server, "-o", str(out),
                     "--quiet"]) == cli.OK
    pic = Image.open(out)
    assert pic.format == "JPEG" and pic.size == (320, 240)
