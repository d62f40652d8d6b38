"""Hostile clients, round two (issue 18): authentication that fails closed, streams that end with a
result or an error, no work after the answer, bodies that cost no more than their size, text from
a model that never breaks an answer, strict types. (The client and the CLI: test_client_cli.py.)

A real server with an API key, a CORS origin, short timers and a model whose label names are
hostile. Timing bounds are generous: they catch stalls of seconds, not percents.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote

import httpx
import pytest
from pydantic import ValidationError

from service.api.middleware import RequestMiddleware
from service.config import Settings
from service.methods import REGISTRY
from service.metrics import Metrics
from tests.conftest import png_bytes, smooth_image
from tests.server import running_server
from tests.test_hostile import _cpu_s

KEY = "k3y-for-tests"
ORIGIN = "http://ui.example"
READ_TIMEOUT_S = 1
REQUEST_TIMEOUT_S = 12
# CR/LF (a header split), a forged header, non-ASCII, a percent sign and HTML: all of it must
# reach the JSON answers as it is and never break a header.
LABEL = "evil\r\nSet-Cookie: owned=1\r\n\r\n<b>ünï</b> 100%"
PNG = png_bytes(smooth_image(7, (64, 48)))
# A GIF sweep of BIG (below) holds 12 x 9.9 megapixels; one more image of it does not fit beside them.
PIXELS_IN_FLIGHT = "125000000"
AUTH = {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def hostile_model(model_dirs, tmp_path_factory):
    """vit_small_patch32 whose config names every class with LABEL (and class 1 with a tab)."""
    d = tmp_path_factory.mktemp("hostile") / "model"
    shutil.copytree(model_dirs["vit_small_patch32_224"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["label_names"] = [LABEL] * cfg["num_classes"]
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


@pytest.fixture(scope="module")
def server(hostile_model):
    args = ["--model", f"evil=local-dir:{hostile_model}", "--api-key", KEY, "--cors-origins", ORIGIN,
            "--read-timeout-s", str(READ_TIMEOUT_S), "--keep-alive-s", "1",
            "--request-timeout-s", str(REQUEST_TIMEOUT_S),
            "--max-pixels", "12000000", "--max-pixels-in-flight", PIXELS_IN_FLIGHT, "--replicas-per-device", "1",
            "--max-delay-ms", "2"]
    with running_server(args) as s:
        yield s


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c:
        yield c


def _files(data: bytes = PNG) -> dict:
    return {"image": ("x.png", data, "image/png")}


# -- 1. authentication fails closed -----------------------------------------------------------------
@pytest.mark.parametrize("key", ["", " ", "\t\n", "  \r\n "])
def test_a_blank_api_key_refuses_to_start(key, monkeypatch, capsys):
    with pytest.raises(ValidationError, match="empty or blank"):
        Settings(api_key=key)
    monkeypatch.setenv("VIT_API_KEY", key)  # as an unset shell variable renders it
    with pytest.raises(ValidationError, match="empty or blank"):
        Settings()
    from service.cli.serve import main

    assert main(["--api-key", key]) == 2
    assert "empty or blank" in capsys.readouterr().err
    with pytest.raises(ValueError, match="empty or blank"):  # and the middleware itself refuses one
        RequestMiddleware(None, metrics=Metrics(), max_body=1, api_key=key)


def test_a_key_no_header_can_carry_is_refused():
    for key in ("with space", "tab\tkey", "ünï"):
        with pytest.raises(ValidationError, match="printable ASCII"):
            Settings(api_key=key)


@pytest.mark.parametrize("values", [[KEY, "wrong"], ["wrong", KEY], [KEY, KEY], ["", KEY], [KEY, ""]])
def test_more_than_one_api_key_header_is_401_whatever_the_order(server, values):
    resp = httpx.get(server.url + "/models", headers=[("X-API-Key", v) for v in values])
    assert resp.status_code == 401 and "more than one" in resp.json()["detail"]
    resp = httpx.post(server.url + "/rollout", headers=[("x-api-key", v) for v in values], files=_files())
    assert resp.status_code == 401
    assert httpx.get(server.url + "/models", headers={"X-API-Key": KEY}).status_code == 200


def test_a_cors_preflight_is_answered_without_the_key_and_the_keyed_request_goes_through(server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "x-api-key, content-type"}
    resp = httpx.options(server.url + "/rollout", headers=preflight)
    assert resp.status_code == 200, resp.text
    assert resp.headers["access-control-allow-origin"] == ORIGIN
    assert "x-api-key" in resp.headers["access-control-allow-headers"].lower()
    assert "POST" in resp.headers["access-control-allow-methods"]
    resp = httpx.post(server.url + "/rollout", headers={"Origin": ORIGIN, **AUTH}, files=_files(),
                      data={"format": "json"})
    assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == ORIGIN
    # an origin that is not allowed gets no CORS grant; the key is still needed for everything else
    other = httpx.options(server.url + "/rollout", headers={**preflight, "Origin": "http://evil.example"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    for not_preflight in ({"Origin": ORIGIN}, {"Access-Control-Request-Method": "POST"}):
        assert httpx.options(server.url + "/rollout", headers=not_preflight).status_code == 401
    assert httpx.post(server.url + "/rollout", headers={"Origin": ORIGIN}, files=_files()).status_code == 401


def test_without_cors_a_preflight_needs_the_key():
    async def go():
        inner_called = []

        async def app(scope, receive, send):
            inner_called.append(scope["type"])

        mw = RequestMiddleware(app, metrics=Metrics(), max_body=100, api_key=KEY, cors=False)
        scope = {"type": "http", "method": "OPTIONS", "path": "/rollout", "headers": [
            (b"origin", ORIGIN.encode()), (b"access-control-request-method", b"POST")], "query_string": b""}
        sent = await _drive(mw, scope, [{"type": "http.request", "body": b"", "more_body": False}])
        return inner_called, sent

    inner_called, sent = asyncio.run(go())
    assert inner_called == [] and sent[0]["status"] == 401


def test_the_explorer_page_cannot_be_framed_and_runs_only_its_own_scripts(server):
    for path in ("/", "/explorer/explorer.js", "/explorer/explorer.css"):
        resp = httpx.get(server.url + path)
        assert resp.status_code == 200, path
        assert resp.headers["x-frame-options"] == "DENY"
        csp = {d.split()[0]: d.split()[1:] for d in resp.headers["content-security-policy"].split("; ")}
        assert csp["frame-ancestors"] == ["'none'"] and csp["script-src"] == ["'self'"]
        assert csp["default-src"] == ["'none'"] and csp["connect-src"] == ["'self'"]


@pytest.mark.parametrize("path", ["/rollout/", "/models/", "/methods/", "/healthz/", "/explorer"])
def test_no_redirect_is_built_from_the_host_header(server, path):
    for method in ("GET", "POST"):
        resp = httpx.request(method, server.url + path, headers={"Host": "evil.example", **AUTH})
        assert not 300 <= resp.status_code < 400 and "location" not in resp.headers, (method, path, resp.status_code)
        assert resp.status_code in (404, 405)


async def _drive(app, scope, incoming):
    """Run an ASGI app on one scope: `incoming` messages, then a disconnect; -> what it sent."""
    sent, queue = [], list(incoming)

    async def receive():
        if queue:
            return queue.pop(0)
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), 5)
    return sent


@pytest.mark.parametrize("kind", ["websocket", "something-else"])
def test_scopes_other_than_http_are_refused_not_passed_through(kind):
    async def go():
        inner_called = []

        async def app(scope, receive, send):
            inner_called.append(scope["type"])
            if scope["type"] == "websocket":
                await send({"type": "websocket.accept"})

        mw = RequestMiddleware(app, metrics=Metrics(), max_body=100, api_key=KEY)
        scope = {"type": kind, "path": "/models", "headers": [], "query_string": b""}
        sent = await _drive(mw, scope, [{"type": "websocket.connect"}])
        lifespan = await _drive(mw, {"type": "lifespan"}, [])
        return inner_called, sent, lifespan

    inner_called, sent, _ = asyncio.run(go())
    assert inner_called == ["lifespan"]  # only the lifespan reaches the app
    assert sent == ([{"type": "websocket.close", "code": 1008, "reason": "this service has no websocket endpoints"}]
                    if kind == "websocket" else [])


def _taken(client, path: str, body: dict):
    """Long work streamed: its answer's head (status, headers) comes at once, its steps later at a low CPU
    priority (a tenth of a core while other work is busy); a test of what is taken reads the head and leaves,
    and the server stops the work."""
    return client.stream("POST", path, json=body, headers={"Accept": "text/event-stream"})


# -- 2. a long stream ends with a result or an error, never a cut --------------------------------------
def _stream(server, body: dict) -> tuple[list[tuple[str, dict]], float]:
    t0 = time.monotonic()
    events, name = [], None
    with httpx.stream("POST", server.url + "/activation-max", json=body, timeout=60,
                      headers={"Accept": "text/event-stream", **AUTH}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events, time.monotonic() - t0


@pytest.mark.solo  # ten steps within a timeout: after the parallel run (Makefile)
def test_a_stream_longer_than_every_timer_but_the_request_timeout_ends_with_its_result(server):
    steps = 10
    for _ in range(10):  # as many steps as last about 4 read timeouts on this machine, now
        events, took = _stream(server, {"steps": steps, "format": "json"})
        if events[-1][0] == "error":  # the machine slowed down past the request timeout: fewer steps
            assert events[-1][1]["status"] == 504 and took > REQUEST_TIMEOUT_S - 1, (steps, took, events[-1])
            steps = max(1, steps // 3)
            continue
        # a progress event per step, then one for the robustness pass after the last step
        assert [n for n, _ in events] == ["progress"] * (steps + 1) + ["result"], (steps, took, events[-1])
        if took > 3 * READ_TIMEOUT_S or steps >= 1000:
            break
        steps = min(1000, max(2 * steps, int(steps * 4 * READ_TIMEOUT_S / took)))
    assert took > 2 * READ_TIMEOUT_S + 1, f"the premise: the stream must outlast the timers ({took:.1f} s)"
    assert took < REQUEST_TIMEOUT_S, "the premise: the stream must end before the request timeout"
    assert [n for n, _ in events] == ["progress"] * (steps + 1) + ["result"]
    assert [d["step"] for _, d in events[:-1]] == list(range(steps + 1))
    assert len(events[-1][1]["objective"]) == steps and events[-1][1]["image"]


@pytest.mark.solo  # bounds a latency: after the parallel run (Makefile)
def test_a_stream_at_the_request_timeout_ends_with_an_error_event(server):
    events, took = _stream(server, {"steps": 1000})
    names = [n for n, _ in events]
    assert names[-1] == "error" and set(names[:-1]) == {"progress"}, names[-3:]
    assert f"longer than {REQUEST_TIMEOUT_S} s" in events[-1][1]["detail"]
    assert events[-1][1]["status"] == 504  # the status the answer would have had: the client reads it, not the text
    assert REQUEST_TIMEOUT_S - 1 < took < REQUEST_TIMEOUT_S + 5


def test_an_empty_body_is_answered_at_once(client):
    """The disconnect watcher starts after the app has had the body's last message, also when
    that message is the only one (Content-Length: 0): the app's own read must not wait for it."""
    for ctype in ("application/json", "multipart/form-data; boundary=x", "text/plain"):
        t0 = time.monotonic()
        resp = client.post("/rollout", content=b"", headers={"content-type": ctype})
        assert 400 <= resp.status_code < 500 and time.monotonic() - t0 < 5, (ctype, resp.status_code)
    with _taken(client, "/activation-max", {"steps": 1, "copies": 1, "format": "json"}) as resp:
        assert resp.status_code == 200


# -- 3. no work after the answer ------------------------------------------------------------------
@pytest.fixture(scope="module")
def big() -> bytes:
    """9.9 megapixels of many colours: each frame takes a while to draw, and to quantize for GIF."""
    return png_bytes(smooth_image(9, (3300, 3000)))


def _idle_cpu_s(pid: int, window_s: float = 1.5) -> float:
    cpu0 = _cpu_s(pid)
    time.sleep(window_s)
    return _cpu_s(pid) - cpu0


@pytest.mark.solo  # counts the server's CPU: after the parallel run (Makefile)
def test_a_client_that_leaves_a_gif_sweep_frees_the_cpu_and_budgets_within_a_second(server, big):
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as sock:
        req = httpx.Request("POST", "http://x/rollout/sweep", files=_files(big), data={"max_side": "0"})  # full size
        body, ctype = req.read(), req.headers["content-type"]
        head = (f"POST /rollout/sweep HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        sock.sendall(head + body)
        time.sleep(1.5)  # decoded, drawing its frames
        assert _idle_cpu_s(server.proc.pid, 0.5) > 0.2, "the premise: the sweep was running"
    time.sleep(1.0)  # the client has left: within a second nothing runs for it
    assert _idle_cpu_s(server.proc.pid) < 0.3, "the server went on working for a client that had left"
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c:
        # the pixel budget is free again: had the sweep kept its 12 frames, this one would not fit
        resp = c.post("/rollout/sweep", files=_files(big), data={"format": "json"})
        assert resp.status_code == 200, resp.text


@pytest.mark.solo  # bounds a latency and counts the server's CPU
@pytest.mark.slow
def test_after_a_504_of_a_gif_sweep_the_cpu_and_budgets_are_free_within_a_second(model_dirs, big):
    """The timeout falls while the frames are drawn (11 ratios), or while they are quantized and
    encoded (4 ratios), or the answer comes in time on a fast machine; either way nothing runs a
    second after it, the pixel budget is whole after the three, and at least one of the three is cut
    by the timeout (the premise)."""
    timeout = 3
    args = ["--model", f"s32=local-dir:{model_dirs['vit_small_patch32_224']}", "--request-timeout-s", str(timeout),
            "--max-pixels", "12000000", "--max-pixels-in-flight", PIXELS_IN_FLIGHT, "--replicas-per-device", "1"]
    statuses = []
    with running_server(args) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        for fmt, ratios in (("gif", None), ("gif", "0,0.3,0.6,0.9"), ("apng", None)):
            fields = {"format": fmt, "max_side": "0", **({"discard_ratios": ratios} if ratios else {})}  # full size
            t0 = time.monotonic()
            resp = c.post("/rollout/sweep", files=_files(big), data=fields)
            statuses.append(resp.status_code)
            assert resp.status_code in (200, 504), resp.text[:300]
            assert time.monotonic() - t0 < timeout + 1.5
            time.sleep(1.0)
            assert _idle_cpu_s(s.proc.pid) < 0.3, f"the server kept working on the {fmt} after its {resp.status_code}"
        # the whole pixel budget is free again: a request that needs most of it is admitted (any one of the three
        # sweeps keeping its frames' pixels would leave too little)
        resp = c.post("/rollout/sweep", files=_files(big), data={"format": "json"})
        assert resp.status_code == 200, resp.text
    assert 504 in statuses, f"the premise: a full-size sweep must outlast {timeout} s ({statuses})"


# -- 4. no body costs far more than its size ----------------------------------------------------------
B64 = base64.b64encode(PNG).decode()


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-8-sig"])
def test_json_that_is_not_utf8_is_refused(client, encoding):
    body = json.dumps({"image": B64, "format": "json"}).encode(encoding)
    resp = client.post("/rollout", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text


@pytest.mark.solo  # bounds a latency (alone: 0.04 s at worst): after the parallel run (Makefile)
def test_a_large_utf16_body_is_refused_in_milliseconds_not_seconds(client):
    # code units whose bytes are quotes and brackets: the pre-scan would steer by them
    body = ('{"image": "' + "\u225b\u227b" * 4_000_000 + '"}').encode("utf-16-le")
    t0 = time.monotonic()
    resp = client.post("/rollout", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400 and time.monotonic() - t0 < 3
    # parsed as what it is, UTF-8 (here all ASCII with NULs between): never decoded as UTF-16
    body = ('{"image": "' + "é" * 4_000_000 + '", "million": [' + "1," * 1_000_000 + '1]}').encode("utf-16")
    t0 = time.monotonic()
    resp = client.post("/rollout", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400 and time.monotonic() - t0 < 3
    assert "not UTF-8" in resp.json()["detail"]


@pytest.mark.solo  # bounds /healthz's latency: after the parallel run (Makefile)
def test_a_list_sent_as_a_huge_string_is_bounded_before_it_is_split_and_health_answers(server, client):
    huge_json = json.dumps({"image": B64, "discard_ratios": "0," * 7_000_000 + "0"}).encode()
    huge_form = {"discard_ratios": "0.5," * 200_000 + "0.5", "format": "json"}  # under the 1 MB part limit
    stalls: list[float] = []
    done = threading.Event()

    def probe():
        with httpx.Client(base_url=server.url, timeout=30) as h:
            while not done.is_set():
                t0 = time.monotonic()
                assert h.get("/healthz").status_code == 200
                stalls.append(time.monotonic() - t0)
                time.sleep(0.05)

    with ThreadPoolExecutor(1) as pool:
        watching = pool.submit(probe)
        try:
            for _ in range(3):
                t0 = time.monotonic()
                resp = client.post("/rollout/sweep", content=huge_json, headers={"content-type": "application/json"})
                assert resp.status_code == 422 and time.monotonic() - t0 < 5, resp.text[:300]
                assert "longer than 4096 characters" in resp.text  # refused by its length, before any split
                resp = client.post("/rollout/sweep", files=_files(), data=huge_form)
                assert resp.status_code == 422 and time.monotonic() - t0 < 5, resp.text[:300]
                assert "discard_ratios" in resp.text and "longer than 4096 characters" in resp.text
        finally:
            done.set()
        watching.result()
    # alone, the slowest probe takes 0.04 s; beside the saturated parallel run every probe took 0.4-0.56 s
    assert stalls and max(stalls) < 1.0, f"/healthz stalled {max(stalls):.2f} s"
    # a string just over the item bound is refused too, before it is split (sweep's own check)
    resp = client.post("/rollout/sweep", files=_files(), data={"discard_ratios": ",".join(["0.1"] * 65)})
    assert resp.status_code == 422 and "more than 64" in resp.text


# -- 5. text from a model never breaks an answer --------------------------------------------------
@pytest.mark.parametrize("path, fields", [("/rollout", {}), ("/grad-rollout", {"category_id": "3"}),
                                          ("/attention", {}), ("/qk", {}), ("/gae", {"category_id": "1"}),
                                          ("/rollout/sweep", {"discard_ratios": "0,0.5"}),
                                          ("/rollout/sweep", {"discard_ratios": "0,0.5", "format": "apng"})])
def test_hostile_labels_are_header_safe_and_the_json_keeps_them(client, path, fields):
    resp = client.post(path, files=_files(), data=fields)
    assert resp.status_code == 200, resp.text
    label = resp.headers["x-predicted-label"]
    assert all(0x20 <= ord(c) < 0x7F for c in label) and unquote(label) == LABEL
    assert "set-cookie" not in resp.headers and resp.headers["x-model"] == "evil"
    as_json = client.post(path, files=_files(), data={**fields, "format": "json"}).json()
    assert as_json.get("predictions", [{"label": LABEL}])[0]["label"] == LABEL


def test_hostile_labels_in_json_answers_and_the_label_list(client):
    pred = client.post("/predict", files=_files()).json()
    assert {p["label"] for p in pred["predictions"]} == {LABEL}
    assert set(client.get("/models/evil/labels").json()["labels"]) == {LABEL}
    with _taken(client, "/activation-max", {"steps": 1, "copies": 1}) as resp:
        assert resp.status_code == 200 and resp.headers["x-model"] == "evil"


def test_header_safe_encodes_what_a_header_cannot_carry():
    from service.api.echoes import header_safe

    for text in (LABEL, "\x00\x7f\x85\u2028", "50% off", "\ud800 lone", "plain label, (ok)"):
        safe = header_safe(text)
        assert all(0x20 <= ord(c) < 0x7F for c in safe)
        assert unquote(safe, errors="backslashreplace") == text.encode("utf-8", "backslashreplace").decode()
    assert header_safe("plain label, (ok)") == "plain label, (ok)" and header_safe("50% off") == "50%25 off"
    assert len(header_safe("a" * 10_000)) == 256


# -- 6. strict types ---------------------------------------------------------------------------------
def _numeric_fields():
    for method in REGISTRY.values():
        schema = method.Params.model_json_schema()
        for name, prop in schema["properties"].items():
            types = {alt.get("type") for alt in prop.get("anyOf", [prop])}
            items = prop.get("items", {}).get("type")
            if types & {"integer", "number"} or items in ("integer", "number"):
                good = prop.get("minimum", prop.get("default", 1))  # the cheapest valid value
                yield method, name, items is not None, schema.get("required", []), good


NUMERIC = [(m.name, f, many, req, good) for m, f, many, req, good in _numeric_fields()]


def test_every_numeric_field_is_covered():
    names = {(m, f) for m, f, *_ in NUMERIC}
    assert ("activation-max", "steps") in names and ("qk", "channel") in names and ("attention", "head") in names
    assert ("rollout-sweep", "discard_ratios") in names and len(names) > 20


@pytest.mark.parametrize("method, field, many, required, good", NUMERIC, ids=[f"{m}.{f}" for m, f, *_ in NUMERIC])
def test_json_booleans_are_refused_for_every_numeric_parameter(client, method, field, many, required, good):
    m = REGISTRY[method]
    base = {"image": B64, "format": "json"} if m.image == "required" else {"format": "json", "steps": 1, "copies": 1}
    base.update({r: 1 for r in required if r != field})
    for value in ([True], [0.5, False]) if many else (True, False):
        resp = client.post(m.route, json={**base, field: value})
        assert resp.status_code == 422, (field, value, resp.text)
        assert any(err["loc"][:2] == ["body", field] for err in resp.json()["detail"]), resp.text
    if m.image == "required":
        resp = client.post(m.route, json={**base, field: [0.5] if many else good})
        assert resp.status_code == 200, resp.text  # the same body with a number is taken
    else:
        with _taken(client, m.route, {**base, field: [0.5] if many else good}) as resp:
            assert resp.status_code == 200, resp.read()  # the same body with a number is taken
