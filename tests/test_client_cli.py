"""The Python client and the command line, against a real server and in process, and against fake
servers that lie (issue 18): the tools never turn a lie into an output file with exit 0."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socketserver
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from PIL import Image

from service.cli import explain as cli
from service.client import AnswerError, AsyncClient, Client, ServiceError
from tests import reference as ref
from tests.conftest import png_bytes, smooth_image
from tests.server import free_port, running_server


@pytest.fixture(scope="module")
def server(model_dirs):
    args = ["--model", f"deit=local-dir:{model_dirs['deit_tiny_patch16_224']}", "--max-delay-ms", "20"]
    with running_server(args) as s:
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
        x = c.activation_max(target="mlp", layer=2, channel=9, steps=3, copies=2,
                             on_progress=lambda s, v: seen.append((s, v)))
        # a progress event per step, then the robustness pass's (the finished picture's objective)
        assert [s for s, _ in seen] == [0, 1, 2, 3] and x.objective == [v for _, v in seen[:-1]]
        assert x.image.size == (224, 224) and x.raw["final_objective"] == seen[-1][1]
        assert x.raw["params"]["param"] == "fourier" and x.raw["params"]["copies"] == 2
        assert x.raw["robustness"] is None or isinstance(x.raw["robustness"], float)
        assert Image.open(io.BytesIO(base64.b64decode(x.raw["image"]))).text["robustness"]
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


def test_cli_maximizes_an_mlp_unit_with_copies_and_reports_its_robustness(server, model_dirs, tmp_path, capsys):
    spec = f"deit=local-dir:{model_dirs['deit_tiny_patch16_224']}"
    flags = ["--method", "activation-max", "--target", "mlp", "--layer", "3", "--channel", "700", "--steps", "2",
             "--copies", "2", "--quiet"]
    for where in (["--server", server], ["--model", spec]):
        out = tmp_path / "unit.png"
        assert cli.main([*flags, *where, "-o", str(out)]) == cli.OK, capsys.readouterr().err
        text = Image.open(out).text  # the figures ride in the PNG's tEXt chunks
        assert set(text) >= {"robustness", "objective", "start_objective"}, text
        assert cli.main([*flags, *where, "--format", "json"]) == cli.OK
        answer = json.loads(capsys.readouterr().out)
        assert len(answer["objective"]) == 2 and answer["params"]["copies"] == 2
        assert "robustness" in answer and answer["final_objective"] is not None
    assert cli.main([*flags, "--copies", "0", "--server", server]) == cli.USAGE
    assert "copies" in capsys.readouterr().err
    assert cli.main([*flags, "--param", "lucid", "--server", server]) == cli.USAGE
    assert "param" in capsys.readouterr().err
    assert cli.main([*flags, "--channel", "768", "--server", server]) == cli.REFUSED
    assert "channel" in capsys.readouterr().err


# -- every method through the client and the CLI (issue 18, class 7) -----------------------------------
CHEAP = {"steps": 2, "discard_ratios": [0.0, 0.9], "category_id": 1}  # small work, where a method takes it


SIGNATURE = {"gif": b"GIF8", "jpeg": b"\xff\xd8\xff", "webp": b"RIFF"}  # else PNG (png, apng)


def _cheap(method) -> dict:
    return {k: v for k, v in CHEAP.items() if k in method.Params.model_fields}


def test_every_method_works_through_the_client_in_every_format(server):
    from service.methods import REGISTRY

    img = smooth_image(140)
    with Client(server) as c:
        for name, method in REGISTRY.items():
            call = getattr(c, name.replace("-", "_"))
            args = () if method.image == "optional" else (img,)
            answer = call(*args, **_cheap(method))
            assert answer.raw["model"] == "deit", name
            if name == "predict":
                assert len(answer.predictions) == 5
            if method.kind == "long":
                continue  # one answer type (the image and objective); PNG is its CLI format
            for fmt in method.formats:
                if fmt != "json":
                    body = call(*args, format=fmt, **_cheap(method))
                    assert body.startswith(SIGNATURE.get(fmt, b"\x89PNG")), (name, fmt)


def test_every_method_works_through_the_cli_in_every_format(server, tmp_path, capsys):
    from service.methods import REGISTRY

    src = tmp_path / "in.png"
    src.write_bytes(png_bytes(smooth_image(141)))
    for name, method in REGISTRY.items():
        flags = [f"--{k.replace('_', '-')}={cli_value(v)}" for k, v in _cheap(method).items()]
        for fmt in method.formats:
            out = tmp_path / f"{name}-{fmt}{cli.EXTENSIONS[fmt]}"
            argv = [str(src), "--method", name, "--server", server, "-o", str(out), "--format", fmt, "--quiet", *flags]
            assert cli.main(argv) == cli.OK, (name, fmt, capsys.readouterr().err)
            data = out.read_bytes()
            if fmt == "json":
                assert json.loads(data)["model"] == "deit"
            else:
                assert data.startswith(SIGNATURE.get(fmt, b"\x89PNG"))
        assert cli.main([str(src), "--method", name, "--server", server, "--quiet", *flags]) == cli.OK  # stdout
        assert json.loads(capsys.readouterr().out)["model"] == "deit"


def cli_value(v) -> str:
    return ",".join(str(x) for x in v) if isinstance(v, list) else str(v)


# -- the client and the CLI never lie (issue 18, class 8): fake servers, one lie each --------------------
PNG = png_bytes(smooth_image(150, (32, 32)))
GOOD_JSON = json.dumps({"model": "m", "method": "rollout", "params": {}, "grid": [1, 1], "mask": [[1.0]],
                        "predictions": []}).encode()


def _head(status: int, ctype: str | None, length: int | None, extra: str = "") -> bytes:
    lines = [f"HTTP/1.1 {status} X"] + ([f"Content-Type: {ctype}"] if ctype else [])
    lines += [f"Content-Length: {length}"] if length is not None else []
    return ("\r\n".join([*lines, "Connection: close", *([extra] if extra else [])]) + "\r\n\r\n").encode()


@contextmanager
def fake_server(behave):
    """A server that reads each request (head and Content-Length body) and answers with whatever
    `behave(sock, n)` writes (n: the request's number, from 0); -> (url, the request paths seen)."""
    seen: list[str] = []

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            sock, data = self.request, b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, body = data.split(b"\r\n\r\n", 1)
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(body) < length:
                body += sock.recv(65536)
            n = len(seen)
            seen.append(head.split(b" ")[1].decode().split("?")[0])  # the path, without the query
            try:
                behave(sock, n)
            except OSError:
                pass

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    with Server(("127.0.0.1", 0), Handler) as srv:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{srv.server_address[1]}", seen
        finally:
            srv.shutdown()


def _answer(status=200, ctype="image/png", body=PNG, extra="", length="auto"):
    def behave(sock, n):
        sock.sendall(_head(status, ctype, len(body) if length == "auto" else length, extra) + body)
    return behave


def _drip(head: bytes, body: bytes = b"", every_s: float = 0.1):
    def behave(sock, n):
        for b in head + body:
            sock.sendall(bytes([b]))
            time.sleep(every_s)
    return behave


def _run_cli(url, tmp_path, *flags, method="rollout", out_name="out.png"):
    src = tmp_path / "in.png"
    src.write_bytes(PNG)
    out = f"{tmp_path}/{out_name}"  # as typed: a trailing slash stays
    code = cli.main([str(src), "--method", method, "--server", url, "-o", out, "--quiet", *flags])
    return code, tmp_path / out_name


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "in.png")


LIES = {
    "redirect-loop": _answer(302, "text/html", b"", extra="Location: /rollout"),
    "html-page": _answer(200, "text/html", b"<html>login</html>"),
    "garbage-as-png": _answer(200, "image/png", b"garbage, not a picture"),
    "png-cut-short": _answer(200, "image/png", PNG[: len(PNG) // 2]),
    "png-truncated-by-close": _answer(200, "image/png", PNG[: len(PNG) // 2], length=len(PNG)),
    "gif-as-png": _answer(200, "image/png", b"GIF89a" + PNG),
    "json-for-png": _answer(200, "application/json", GOOD_JSON),
    "empty-200": _answer(200, "image/png", b""),
    "no-content-type": _answer(200, None, PNG),
    "png-as-html": _answer(200, "text/html", PNG),
    "bad-gzip": _answer(200, "image/png", b"not gzip at all", extra="Content-Encoding: gzip"),
    "not-http": lambda sock, n: sock.sendall(b"SSH-2.0-OpenSSH_9.6\r\n" * 10),
}


@pytest.mark.parametrize("lie", list(LIES))
def test_the_cli_never_writes_a_lie(lie, tmp_path, capsys):
    with fake_server(LIES[lie]) as (url, seen):
        code, out = _run_cli(url, tmp_path)
    assert code == cli.FAILED, (lie, capsys.readouterr().err)
    assert _leftovers(tmp_path) == [], "no output file and no temporary file is left"
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("body, ctype", [(b"{not json", "application/json"), (b"[1, 2]", "application/json"),
                                         (b'{"model": "m"}', "application/json"), (PNG, "application/json"),
                                         ('{"a": 1}'.encode("utf-16"), "application/json")])
def test_the_client_refuses_json_that_is_not_the_answer(body, ctype):
    from service.client import AnswerError

    with fake_server(_answer(200, ctype, body)) as (url, _), Client(url, retries=0) as c:
        with pytest.raises(AnswerError) as err:
            c.rollout(PNG)
        assert err.value.status == 502


def test_the_cli_writes_a_true_answer(tmp_path):
    """The fake servers' control case: a whole PNG with its content type is written, exit 0."""
    with fake_server(_answer()) as (url, seen):
        code, out = _run_cli(url, tmp_path)
    assert code == cli.OK and out.read_bytes() == PNG and seen == ["/rollout"]
    assert _leftovers(tmp_path) == ["out.png"]


@pytest.mark.parametrize("drip", ["headers", "body", "stall"])
def test_one_deadline_bounds_a_dripping_server(drip, tmp_path):
    head = _head(200, "image/png", len(PNG))
    behave = _drip(head) if drip == "headers" else _drip(b"", PNG, every_s=0.05)
    if drip == "stall":  # nothing at all, for longer than the deadline
        def behave(sock, n):
            time.sleep(30)
    if drip == "body":
        def behave(sock, n, _b=behave):  # headers at once, then the body a byte at a time
            sock.sendall(head)
            _b(sock, n)
    with fake_server(behave) as (url, _):
        t0 = time.monotonic()
        code, out = _run_cli(url, tmp_path, "--deadline", "2")
        took = time.monotonic() - t0
    assert code == cli.FAILED and not out.exists() and _leftovers(tmp_path) == []
    assert took < 2 + 3, f"the 2 s deadline took {took:.1f} s"


@pytest.mark.parametrize("after", ["inf", "1e308", "100000", "nan", "-5", "Wed, 21 Oct 2099 07:28:00 GMT"])
def test_an_absurd_retry_after_cannot_stretch_the_wait(after):
    def behave(sock, n):
        if n < 2:
            body = b'{"detail": "busy"}'
            sock.sendall(_head(503, "application/json", len(body), f"Retry-After: {after}") + body)
        else:
            sock.sendall(_head(200, "application/json", len(GOOD_JSON)) + GOOD_JSON)

    with fake_server(behave) as (url, seen), Client(url, retries=3, backoff=0.05, max_retry_after=0.3) as c:
        t0 = time.monotonic()
        assert c.rollout(PNG).mask.tolist() == [[1.0]]
        assert time.monotonic() - t0 < 3 and len(seen) == 3
    # with the default cap (30 s) but a 2 s deadline, a long Retry-After gives up at once with the 503
    from service.client import ServiceError

    with fake_server(behave) as (url, seen), Client(url, retries=3, deadline=2) as c:
        t0 = time.monotonic()
        if after in ("1e308", "100000"):  # finite: capped, and past the deadline (inf, nan: the backoff)
            with pytest.raises(ServiceError) as err:
                c.rollout(PNG)
            assert err.value.status == 503 and len(seen) == 1
        assert time.monotonic() - t0 < 3


def test_the_retry_after_cap_applies_to_the_async_client_too():
    def behave(sock, n):
        if n == 0:
            sock.sendall(_head(503, "application/json", 2, "Retry-After: 1e308") + b"{}")
        else:
            sock.sendall(_head(200, "application/json", len(GOOD_JSON)) + GOOD_JSON)

    async def go(url):
        async with AsyncClient(url, max_retry_after=0.1) as c:
            return await c.rollout(PNG)

    with fake_server(behave) as (url, seen):
        t0 = time.monotonic()
        assert asyncio.run(go(url)).mask.tolist() == [[1.0]] and time.monotonic() - t0 < 3 and len(seen) == 2


@pytest.mark.parametrize("declared", [True, False])
def test_an_answer_past_the_size_limit_is_refused_and_never_held(declared, tmp_path):
    total = 64 * 1024 * 1024

    def behave(sock, n):  # a "PNG" from its signature to its end marker, only far too large
        sock.sendall(_head(200, "image/png", total if declared else None) + PNG[:8])
        block = b"\x00" * 65536
        for _ in range((total - 8 - 12) // len(block)):
            sock.sendall(block)
        sock.sendall(b"\x00" * ((total - 20) % len(block)) + PNG[-12:])

    with fake_server(behave) as (url, _):
        import tracemalloc

        tracemalloc.start()
        code, out = _run_cli(url, tmp_path, "--max-answer-mb", "2")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert code == cli.FAILED and not out.exists() and _leftovers(tmp_path) == []
    assert peak < 16 * 1024 * 1024, f"the client held {peak / 2**20:.0f} MB"


def _sse(*events: tuple[str, str]) -> bytes:
    return "".join(f"event: {name}\ndata: {data}\n\n" for name, data in events).encode()


RESULT = json.dumps({"model": "m", "params": {}, "image": base64.b64encode(PNG).decode(), "objective": [1.0, 2.0]})
STREAM_LIES = {
    "data-not-json": _sse(("progress", '{"step": 0, "objective": 1.0}'), ("progress", "<html>")),
    "result-without-image": _sse(("progress", '{"step": 0, "objective": 1.0}'), ("result", '{"objective": [1.0]}')),
    "result-image-not-png": _sse(("result", json.dumps({"image": base64.b64encode(b"GIF89a...").decode(),
                                                         "objective": []}))),
    "progress-without-step": _sse(("progress", '{"objective": 1.0}')),
    "no-result": _sse(("progress", '{"step": 0, "objective": 1.0}')),
    "error-event": _sse(("error", '{"detail": "engine failed"}')),
}


@pytest.mark.parametrize("lie", list(STREAM_LIES))
def test_a_broken_event_stream_is_exit_5_not_a_trace(lie, tmp_path, capsys):
    body = STREAM_LIES[lie]
    with fake_server(_answer(200, "text/event-stream", body)) as (url, _):
        code, out = _run_cli(url, tmp_path, "--steps", "2", method="activation-max")
    err = capsys.readouterr().err
    assert code == cli.FAILED and not out.exists() and "Traceback" not in err, err
    with fake_server(_answer(200, "text/html", b"<html></html>")) as (url, _):
        assert _run_cli(url, tmp_path, "--steps", "2", method="activation-max")[0] == cli.FAILED


@pytest.mark.parametrize(("data", "status"), [('{"status": 504, "detail": "no time left"}', 504),
                                              ('{"detail": "the request took longer than 4 s"}', 500),
                                              ('{"status": "504", "detail": "a string"}', 500),
                                              ('{"status": 200, "detail": "not an error status"}', 500)])
def test_an_error_event_raises_its_declared_status_never_one_read_from_its_text(data, status):
    body = _sse(("progress", '{"step": 0, "objective": 1.0}'), ("error", data))
    with fake_server(_answer(200, "text/event-stream", body)) as (url, _):
        with Client(url, retries=0) as c, pytest.raises(ServiceError) as err:
            c.activation_max(steps=2, on_progress=lambda s, v: None)
        assert err.value.status == status and not isinstance(err.value, AnswerError)

        async def go():
            async with AsyncClient(url, retries=0) as c:
                await c.activation_max(steps=2, on_progress=lambda s, v: None)

        with pytest.raises(ServiceError) as err:
            asyncio.run(go())
        assert err.value.status == status


def test_the_streamed_maximization_retries_503_like_every_call(tmp_path):
    good = _sse(("progress", '{"step": 0, "objective": 1.0}'), ("progress", '{"step": 1, "objective": 2.0}'),
                ("result", RESULT))

    def behave(sock, n):
        if n < 2:
            sock.sendall(_head(503, "application/json", 2, "Retry-After: 0") + b"{}")
        else:
            sock.sendall(_head(200, "text/event-stream", len(good)) + good)

    with fake_server(behave) as (url, seen):
        code, out = _run_cli(url, tmp_path, "--steps", "2", method="activation-max")
        assert code == cli.OK and out.read_bytes().startswith(b"\x89PNG") and len(seen) == 3
        seen.clear()
        progress = []
        with Client(url) as c:
            x = c.activation_max(steps=2, on_progress=lambda s, v: progress.append(s))
        assert progress == [0, 1] and x.objective == [1.0, 2.0] and len(seen) == 3


def test_out_is_checked_before_any_request(tmp_path, capsys):
    with fake_server(_answer()) as (url, seen):
        folder = tmp_path / "existing"
        folder.mkdir()
        code, _ = _run_cli(url, tmp_path, out_name="existing")
        assert code == cli.OK and (folder / "in.png").read_bytes() == PNG  # inside the folder, named after the image
        code, _ = _run_cli(url, tmp_path, "--format", "json", out_name="existing/")
        assert code == cli.FAILED  # the fake answers a PNG to a JSON request: refused, not written
        assert sorted(p.name for p in folder.iterdir()) == ["in.png"]
        seen.clear()
        for missing in ("missing/out.png", "missing/", "existing/deeper/out.png"):
            capsys.readouterr()
            code, _ = _run_cli(url, tmp_path, out_name=missing)
            assert code == cli.USAGE and "no such folder" in capsys.readouterr().err, missing
        (tmp_path / "file.txt").write_text("x")
        src = tmp_path / "in.png"
        src.with_name("in2.png").write_bytes(PNG)
        assert cli.main([str(src), str(src.with_name("in2.png")), "--server", url, "-o", str(tmp_path / "file.txt")]) \
            in (cli.USAGE,)
        assert cli.main([str(src), "--server", url, "--format", "png", "--quiet"]) == cli.USAGE  # binary to stdout
        assert seen == [], "a request was sent before -o was checked"
