"""The Python client and the command line, against a real server and in process."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from service import cli
from service.client import AsyncClient, Client, ServiceError
from tests import reference as ref
from tests.conftest import png_bytes, smooth_image
from tests.server import free_port, running_server


@pytest.fixture(scope="module")
def server(model_dirs):
    with running_server(["--model", f"deit=local-dir:{model_dirs['deit_tiny_patch16_224']}", "--max-delay-ms", "20"]) as s:
        yield s.url


@pytest.fixture(scope="module")
def r(models):
    return ref.Reference(models["deit_tiny_patch16_224"])


def test_client_calls_answer_numpy_masks_and_png_bytes(server, r, tmp_path):
    img = smooth_image(120)
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(img))
    c_ref = r.run(ref.preprocess(img, r.model), category=9)
    with Client(server) as c:
        e = c.rollout(path, discard_ratio=0.0, head_fusion="mean")
        assert isinstance(e.mask, np.ndarray) and e.mask.shape == (14, 14)
        np.testing.assert_allclose(e.mask, r.rollout(c_ref, "mean", 0.0), atol=1e-4)
        np.testing.assert_allclose(c.gae(img, category_id=9).mask, r.gae(c_ref), atol=1e-4)  # a PIL image
        arr = np.asarray(img)
        both = c.grad_rollout([arr, arr.astype(np.float32) / 255.0], category_id=9, discard_ratio=0.0)
        assert len(both) == 2
        for one in both:  # uint8 and float arrays: the same picture
            np.testing.assert_allclose(one.mask, r.grad_rollout(c_ref, "mean", 0.0), atol=1e-4)
        png = c.rollout(png_bytes(img), format="png")
        assert Client.image(png).size == (224, 224)
        sweep = c.rollout_sweep(img, discard_ratios=[0.0, 0.9])
        assert sweep.masks.shape == (2, 14, 14)
        assert {m["name"] for m in c.methods()} >= {"rollout", "gae"} and c.models()[0]["name"] == "deit"
        seen = []
        x = c.activation_max(category_id=3, steps=3, on_progress=lambda s, v: seen.append((s, v)))
        assert [s for s, _ in seen] == [0, 1, 2] and x.objective == [v for _, v in seen] and x.image.size == (224, 224)
        with pytest.raises(ServiceError) as err:
            c.grad_rollout(img, category_id=5000)
        assert err.value.status == 422 and "category_id" in str(err.value.detail)


def test_async_client(server):
    async def go():
        async with AsyncClient(server) as c:
            a, b = await asyncio.gather(c.rollout(smooth_image(1)), c.attention(smooth_image(2), head="max"))
            x = await c.activation_max(steps=2, on_progress=lambda s, v: None)
            return a, b, x

    a, b, x = asyncio.run(go())
    assert a.mask.shape == (14, 14) and b.layers.shape == (12, 14, 14) and len(x.objective) == 2


def test_503_is_retried_honouring_retry_after():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 3:
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"detail": "queue full"})
        return httpx.Response(200, json={"model": "m", "method": "rollout", "params": {}, "grid": [1, 1],
                                         "mask": [[1.0]], "predictions": []})

    with Client("http://test", transport=httpx.MockTransport(handler), retries=3) as c:
        assert c.rollout(b"png").mask.tolist() == [[1.0]] and len(calls) == 3
    calls.clear()
    with Client("http://test", transport=httpx.MockTransport(handler), retries=1) as c:
        with pytest.raises(ServiceError) as err:
            c.rollout(b"png")
    assert err.value.status == 503 and err.value.detail == "queue full" and len(calls) == 2


def _folder(tmp_path, n=2):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(n):
        (d / f"img{i}.png").write_bytes(png_bytes(smooth_image(130 + i)))
    return d


def test_cli_in_process_writes_what_the_server_answers(server, model_dirs, tmp_path, capsys):
    d = _folder(tmp_path)
    out = tmp_path / "out"
    spec = f"deit=local-dir:{model_dirs['deit_tiny_patch16_224']}"
    assert cli.main([str(d), "--method", "grad-rollout", "--category-id", "4", "--model", spec, "-o", str(out),
                     "--format", "json", "--quiet"]) == 0
    with Client(server) as c:
        for i in range(2):
            local = json.loads((out / f"img{i}.json").read_text())
            served = c.grad_rollout(d / f"img{i}.png", category_id=4).raw
            assert local["params"] == served["params"] and local["model"] == served["model"]
            np.testing.assert_allclose(local["mask"], served["mask"], atol=1e-5)
    assert cli.main([str(d / "img0.png"), "--model", spec, "-o", str(tmp_path / "one.png")]) == 0
    assert Image.open(tmp_path / "one.png").size == (224, 224)


def test_cli_through_the_server_and_its_exit_codes(server, tmp_path, capsys):
    d = _folder(tmp_path)
    out = tmp_path / "sweeps"
    assert cli.main([str(d / "*.png"), "--method", "rollout-sweep", "--discard-ratios", "0,0.9", "--server", server,
                     "-o", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["img0.gif", "img1.gif"]
    assert Image.open(out / "img0.gif").n_frames == 2
    capsys.readouterr()
    assert cli.main([str(d / "img0.png"), "--method", "qk", "--layer", "99", "--server", server]) == cli.REFUSED
    assert "layer" in capsys.readouterr().err
    assert cli.main([str(d / "img0.png"), "--discard-ratio", "2", "--server", server]) == cli.USAGE
    assert cli.main(["--method", "rollout", "--server", server]) == cli.USAGE  # no images
    assert cli.main([str(d / "nope.png"), "--server", server]) == cli.USAGE
    assert cli.main([str(d / "img0.png"), "--server", f"http://127.0.0.1:{free_port()}"]) == cli.UNREACHABLE
    assert "cannot reach" in capsys.readouterr().err
    assert cli.main([str(d / "img0.png"), "--server", server]) == 0  # no -o: JSON on stdout
    assert json.loads(capsys.readouterr().out)["method"] == "rollout"
