"""Hostile clients, round three (issue 24, item 1): no unit of work outlives its answer.

After a 504 or a client's disconnect, nothing runs for that request a second later, whatever the
work (the chunks of faithfulness copies of maps, sweeps and /compare, long work); what scoring will
cost is charged before admission, and a request that can never fit is refused naming the limit; a
small request beside a huge one is answered while the huge one runs.

The server's CPU time is read from /proc/<pid>/stat. Engine and batcher units check the same
guards without a server (forwards counted).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import socket
import time

import httpx
import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from service import batching, budget
from service.batching import Batcher
from service.engine import engine as engine_mod
from service.engine.contract import Job
from service.engine.engine import Engine
from service.methods import REGISTRY
from tests.conftest import jpeg_bytes, smooth_image
from tests.server import running_server
from tests.test_hostile import _cpu_s

REQUEST_TIMEOUT_S = 3
FORWARDS_IN_FLIGHT = 12_000
JPEG = jpeg_bytes(smooth_image(3, (224, 224)))
# CPU seconds an idle server may use in 2 s (an idle one uses about 0.02; one still working on the 2 shared
# cores of the development machine, 0.3 to 2)
IDLE_CPU_S = 0.25


# -- the engine: a stopped job stops between chunks, its neighbours are answered as alone ----------------
@pytest.fixture(scope="module")
def tiny_engine() -> Engine:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    return Engine(model.eval(), torch.device("cpu"))


class _Counter:
    """Counts the images the model sees after `armed` (the perturbed copies, the pass excluded)."""

    def __init__(self, engine: Engine) -> None:
        self.copies = 0
        self.armed = False
        self.handle = engine.model.register_forward_hook(self._seen)

    def _seen(self, _module, args, _out) -> None:
        if self.armed:
            self.copies += args[0].shape[0]

    def stop_after(self, n: int):
        """A stop signal that fires once n copies have run."""
        return lambda: TimeoutError("test deadline") if self.copies >= n else None


@pytest.mark.parametrize("name", ["grad-rollout", "rollout-sweep"])
def test_a_stopped_job_stops_between_chunks_and_its_neighbour_is_answered_as_alone(tiny_engine, monkeypatch, name):
    chunk = 4
    monkeypatch.setitem(engine_mod.FAITHFULNESS_CHUNK, "cpu", chunk)
    method = REGISTRY[name]
    extra = {"category_id": 1} if name == "grad-rollout" else {"discard_ratios": (0.0, 0.5, 0.9)}
    params = method.Params(faithfulness=True, faithfulness_steps=32, **extra)
    x = torch.from_numpy(np.array(smooth_image(5, (64, 64))))[None].repeat(2, 1, 1, 1)
    x[1] = x[1].flip(0)
    counter = _Counter(tiny_engine)
    try:
        # image 1 alone: what it costs and answers
        (alone,) = _armed_run(tiny_engine, counter, x[1:], [method.job(params)])
        own = counter.copies
        assert own > 8 * chunk, "the premise: many chunks of copies"
        counter.copies = 0
        # image 0 (stopped after 2 chunks of copies) beside image 1 (never stopped)
        jobs = [Job(method, params, stop=counter.stop_after(2 * chunk)), method.job(params)]
        stopped, neighbour = _armed_run(tiny_engine, counter, x, jobs)
    finally:
        counter.handle.remove()
    assert isinstance(stopped, TimeoutError)
    assert counter.copies <= own + 3 * chunk, f"{counter.copies} copies ran: the stopped job's went on"
    for a, b in zip(alone.faithfulness, neighbour.faithfulness):
        assert a.deletion == pytest.approx(b.deletion, rel=1e-4, abs=1e-6)
        assert a.insertion == pytest.approx(b.insertion, rel=1e-4, abs=1e-6)
    assert np.allclose(alone.maps, neighbour.maps, rtol=1e-4, atol=1e-6)


def _armed_run(engine: Engine, counter: _Counter, x: torch.Tensor, jobs: list) -> list:
    """Run the jobs with the counter armed once the pass is done (the first scoring chunk)."""
    calls = {"n": 0}

    def between() -> None:
        calls["n"] += 1

    original = engine._score

    def score(*args, **kw):
        counter.armed = True
        try:
            return original(*args, **kw)
        finally:
            counter.armed = False

    engine._score = score
    try:
        return engine.run(x, jobs, between=between)
    finally:
        del engine._score


def test_a_chunk_whose_images_have_all_stopped_ends_within_a_block(tiny_engine, monkeypatch):
    """One chunk holds every copy: the stop falls during its forward pass, which ends before the next block."""
    monkeypatch.setitem(engine_mod.FAITHFULNESS_CHUNK, "cpu", 10_000)
    method = REGISTRY["grad-rollout"]
    params = method.Params(category_id=1, faithfulness=True, faithfulness_steps=32)
    first, last = tiny_engine.model.blocks[0], tiny_engine.model.blocks[-1]
    seen = {"first": 0, "last": 0, "armed": False}
    hooks = [first.register_forward_hook(lambda *_: seen.__setitem__("first", seen["first"] + seen["armed"])),
             last.register_forward_hook(lambda *_: seen.__setitem__("last", seen["last"] + seen["armed"]))]
    original = tiny_engine._score

    def score(*args, **kw):
        seen["armed"] = True
        return original(*args, **kw)

    monkeypatch.setattr(tiny_engine, "_score", score)
    stop = Job(method, params, stop=lambda: TimeoutError("test deadline") if seen["first"] else None)
    try:
        (out,) = tiny_engine.run(torch.zeros(1, 64, 64, 3, dtype=torch.uint8), [stop])
    finally:
        for h in hooks:
            h.remove()
    assert isinstance(out, TimeoutError)
    assert seen["first"] == 1 and seen["last"] == 0, f"the chunk ran on past its stop: {seen}"


def test_a_batch_answered_between_two_blocks_of_a_chunk_gets_the_answer_it_gets_alone(tiny_engine, monkeypatch):
    """`between` runs while a chunk's forward pass is in flight (before each block) and out of inference
    mode: a gradient pass with its own scoring works there, and neither answer changes."""
    monkeypatch.setitem(engine_mod.FAITHFULNESS_CHUNK, "cpu", 8)
    outer, inner = REGISTRY["grad-rollout"], REGISTRY["gae"]
    po = outer.Params(category_id=1, faithfulness=True, faithfulness_steps=16)
    pi = inner.Params(category_id=2, faithfulness=True, faithfulness_steps=8)
    xo = torch.from_numpy(np.array(smooth_image(6, (64, 64))))[None]
    xi = xo.flip(1)
    (alone_o,) = tiny_engine.run(xo, [outer.job(po)])
    (alone_i,) = tiny_engine.run(xi, [inner.job(pi)])
    calls, nested = {"n": 0, "in_block": 0}, []

    def between() -> None:
        calls["n"] += 1
        calls["in_block"] += not torch.is_inference_mode_enabled() and any(
            f.function == "_call_impl" for f in inspect.stack(0)[:12])
        if not nested:
            nested.extend(tiny_engine.run(xi, [inner.job(pi)]))

    (got,) = tiny_engine.run(xo, [outer.job(po)], between=between)
    assert calls["in_block"] >= 1, "the premise: between ran inside a forward pass"
    for want, have in ((alone_o, got), (alone_i, nested[0])):
        assert np.allclose(want.maps, have.maps, rtol=1e-5, atol=1e-7)
        for a, b in zip(want.faithfulness, have.faithfulness):
            assert a.deletion == pytest.approx(b.deletion, rel=1e-4, abs=1e-6)
            assert a.insertion == pytest.approx(b.insertion, rel=1e-4, abs=1e-6)


def test_a_job_stopped_before_the_pass_is_left_out_and_its_error_is_its_answer(tiny_engine):
    method = REGISTRY["rollout"]
    params = method.Params()
    x = torch.zeros(2, 64, 64, 3, dtype=torch.uint8)
    gone = Job(method, params, stop=lambda: budget.Abandoned("client left"))
    out = tiny_engine.run(x, [gone, method.job(params)])
    assert isinstance(out[0], budget.Abandoned) and out[1].maps.shape == (8, 8)


def test_the_stop_signal_reads_the_deadline_and_the_lease():
    async def go():
        lease = budget.Lease()
        budget.lease.set(lease)
        budget.deadline.set(time.monotonic() + 0.2)
        stop = budget.stop_signal()
        assert stop() is None
        await asyncio.sleep(0.3)
        assert isinstance(stop(), TimeoutError)
        budget.deadline.set(None)
        stop = budget.stop_signal()
        assert stop() is None
        lease.stop("the client disconnected")
        assert isinstance(stop(), budget.Abandoned) and "disconnected" in str(stop())

    asyncio.run(go())
    assert budget.stop_signal() is None  # outside a request: nothing to check


# -- the batcher: a small item waits for one unit of a long batch, not for all of it ----------------------
def test_a_small_item_is_answered_between_the_units_of_a_long_batch():
    done: dict[str, float] = {}

    def work(items: list[str]) -> list[str]:
        if items == ["long"]:
            for _ in range(60):  # 3 s in units of 50 ms
                time.sleep(0.05)
                batching.interlude()
            done["long"] = time.monotonic()
        else:
            for it in items:
                done[it] = time.monotonic()
        return items

    async def go():
        b = Batcher([work], max_batch_size=4, max_delay_ms=1)
        b.start()
        try:
            long = asyncio.ensure_future(b.submit("long"))
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            assert await b.submit("small") == "small"
            waited = time.monotonic() - t0
            assert not long.done(), "the premise: the long batch still runs"
            assert await long == "long"
            return waited
        finally:
            await b.stop()

    waited = asyncio.run(go())
    assert done["small"] < done["long"] and waited < 2.0, f"the small item waited {waited:.2f} s"


def test_an_interlude_outside_a_batch_does_nothing():
    batching.interlude()


# -- a server: CPU after a 504 and after a disconnect, for every kind of work ------------------------------
@pytest.fixture(scope="module")
def server(model_dirs):
    args = ["--model", f"s32=local-dir:{model_dirs['vit_small_patch32_224']}",
            "--request-timeout-s", str(REQUEST_TIMEOUT_S), "--replicas-per-device", "1", "--max-delay-ms", "2",
            "--max-forwards-in-flight", str(FORWARDS_IN_FLIGHT)]
    with running_server(args) as s:
        yield s


def _b64(n: int = 1) -> list[str]:
    return [base64.b64encode(JPEG).decode()] * n


# (path, JSON body): each runs far longer than the request timeout on a 2-core machine, scaled down from the issue's
WORK = {
    "maps": ("/grad-rollout", {"image": _b64(8), "category_id": 1, "faithfulness": True, "faithfulness_steps": 64,
                               "format": "json"}),
    "sweep": ("/grad-rollout/sweep", {"image": _b64(1), "category_id": 1, "faithfulness": True,
                                      "faithfulness_steps": 64, "discard_ratios": [i / 20 for i in range(16)],
                                      "format": "json"}),
    "compare": ("/compare", {"image": _b64(1)[0], "faithfulness_steps": 64, "settings": [
        {"method": m, "params": {"category_id": c} if m != "rollout" else {"discard_ratio": r}}
        for m, c, r in [("rollout", 0, 0.9), ("rollout", 0, 0.5), ("grad-rollout", 1, 0), ("grad-rollout", 2, 0),
                        ("gae", 1, 0), ("gae", 2, 0), ("gae", 3, 0), ("grad-rollout", 3, 0)]]}),
    "long": ("/activation-max", {"steps": 1000, "format": "json"}),
}
# Long work's steps run at nice 10 (service/batching.py): beside the saturated parallel run, the step in flight
# when the work stops (0.26 CPU-s here, one core) gets a tenth of a core and ends about 2.6 s later, inside the
# window these tests count (0.26 s counted once, against 0.25); on a core of its own it ends within 0.3 s.
# So its cases count the server's CPU after the parallel run, as every solo test does (Makefile).
KINDS = [pytest.param(k, marks=pytest.mark.solo) if k == "long" else k for k in sorted(WORK)]


def _cpu_over(pid: int, window_s: float) -> float:
    cpu0 = _cpu_s(pid)
    time.sleep(window_s)
    return _cpu_s(pid) - cpu0


def _working(pid: int, within_s: float = 5.0) -> bool:
    """Whether the server uses 0.1 CPU-s within a second of some moment of the next `within_s`: long work's
    steps run at nice 10, and on a busy machine a second can pass with little of a core for them."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if _cpu_over(pid, 1.0) > 0.1:
            return True
    return False


def _port(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


@pytest.mark.parametrize("kind", KINDS)
def test_after_a_504_nothing_runs_for_the_request_a_second_later(server, kind):
    path, body = WORK[kind]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        t0, cpu0 = time.monotonic(), _cpu_s(server.proc.pid)
        resp = c.post(path, json=body)
        assert resp.status_code == 504, resp.text
        assert time.monotonic() - t0 < REQUEST_TIMEOUT_S + 2
        assert _cpu_s(server.proc.pid) - cpu0 > 0.3, f"{kind}: the premise: the work was running"
    time.sleep(1.0)  # within a second of the answer, the work has stopped
    grew = _cpu_over(server.proc.pid, 2.0)
    assert grew < IDLE_CPU_S, f"{kind}: the server used {grew:.2f} s of CPU in the 2 s after its 504"
    _budgets_free(server)


@pytest.mark.parametrize("kind", KINDS)
def test_after_a_disconnect_nothing_runs_for_the_request_a_second_later(server, kind):
    path, body = WORK[kind]
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", _port(server))) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        time.sleep(1.0)  # decoded, computing
        assert _working(server.proc.pid), f"{kind}: the premise: the work was running"
    time.sleep(1.0)  # the client has left: within a second nothing runs for it
    grew = _cpu_over(server.proc.pid, 2.0)
    assert grew < IDLE_CPU_S, f"{kind}: the server used {grew:.2f} s of CPU in the 2 s after its client left"
    _budgets_free(server)


def _budgets_free(server) -> None:
    """The forwards budget is whole again: a request that needs nearly all of it is admitted (and answered
    504 here, its work being long), not refused 503 after a wait."""
    n = FORWARDS_IN_FLIGHT // (16 * 65 * 2)  # images of a 16-ratio sweep at 64 steps
    with httpx.Client(base_url=server.url, timeout=60) as c:
        resp = c.post("/grad-rollout/sweep", json={
            "image": _b64(n), "category_id": 1, "faithfulness": True, "faithfulness_steps": 64,
            "discard_ratios": [i / 20 for i in range(16)], "format": "json"})
        assert resp.status_code == 504, resp.text
    time.sleep(1.0)


# -- charged before admission ---------------------------------------------------------------------------
def _bodies(path: str, fields: dict, n: int):
    """The same request as multipart, JSON and (for one image) a raw body with the query string."""
    form = {k: ",".join(map(str, v)) if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in fields.items()}
    yield "multipart", {"files": [("image", ("x.jpg", JPEG, "image/jpeg"))] * n, "data": form}
    yield "json", {"json": {"image": _b64(n), **fields}}
    if n == 1:
        yield "raw", {"content": JPEG, "headers": {"content-type": "image/jpeg"}, "params": form}


def test_a_request_whose_scoring_can_never_fit_is_refused_up_front_naming_the_limit(server):
    sweep = {"category_id": 1, "faithfulness": True, "faithfulness_steps": 64,
             "discard_ratios": [i / 64 for i in range(64)], "format": "json"}  # 64 x 65 x 2 = 8320 an image
    maps = {"category_id": 1, "faithfulness": True, "faithfulness_steps": 64, "format": "json"}
    cases = [("/grad-rollout/sweep", sweep, 2, 2 * 8320), ("/gae", maps, 16, 16 * 130)]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for path, fields, n, cost in cases:
            for body, kw in _bodies(path, fields, n):
                t0 = time.monotonic()
                if cost <= FORWARDS_IN_FLIGHT:  # admitted: its work has begun when no refusal came within a second
                    try:
                        resp = c.post(path, **kw, timeout=httpx.Timeout(60, read=1.0))
                    except httpx.ReadTimeout:
                        continue  # the client leaves; the server stops the work (the disconnect tests above)
                    assert resp.status_code != 413, (path, body, resp.text)
                    continue
                resp = c.post(path, **kw)
                detail = resp.json()["detail"]
                assert resp.status_code == 413, (path, body, resp.text)
                assert "--max-forwards-in-flight" in detail and str(cost) in detail, detail
                assert str(FORWARDS_IN_FLIGHT) in detail, detail
                assert time.monotonic() - t0 < 2, "refused only after work"
        time.sleep(1.0)
    # one image of the same sweep fits, and is admitted (its work takes longer than the timeout)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post("/grad-rollout/sweep", json={"image": _b64(1), **sweep}).status_code == 504
    time.sleep(1.0)


def test_the_forwards_of_scoring_are_what_the_methods_declare():
    sweep = REGISTRY["grad-rollout-sweep"]
    p = sweep.Params(category_id=0, faithfulness=True, faithfulness_steps=64, discard_ratios=(0.1, 0.2, 0.3))
    assert sweep.forwards(p) == 3 * 65 * 2
    assert sweep.forwards(p.model_copy(update={"faithfulness": False})) == 0
    assert REGISTRY["rollout"].forwards(REGISTRY["rollout"].Params(faithfulness=True, faithfulness_steps=8)) == 18
    assert REGISTRY["attention"].forwards(REGISTRY["attention"].Params()) == 0


# -- shared fairly ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_small_request_beside_the_most_expensive_admissible_one_is_answered(model_dirs):
    """One replica, busy with a sweep of 64 ratios x 64 steps (8320 forwards: minutes here); a small
    /rollout beside it is answered between two of its chunks, long before it ends."""
    args = ["--model", f"s32=local-dir:{model_dirs['vit_small_patch32_224']}", "--request-timeout-s", "120",
            "--replicas-per-device", "1", "--max-forwards-in-flight", "8320"]
    huge = {"image": _b64(1), "category_id": 1, "faithfulness": True, "faithfulness_steps": 64,
            "discard_ratios": [i / 64 for i in range(64)], "format": "json"}
    with running_server(args) as s:
        with httpx.Client(base_url=s.url, timeout=60) as c:  # warm: the small request alone
            t0 = time.monotonic()
            assert c.post("/rollout", json={"image": _b64(1)[0], "format": "json"}).status_code == 200
            alone = time.monotonic() - t0
        data = json.dumps(huge).encode()
        with socket.create_connection(("127.0.0.1", _port(s))) as sock:
            sock.sendall(f"POST /grad-rollout/sweep HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
            time.sleep(4)  # admitted, scoring
            with httpx.Client(base_url=s.url, timeout=60) as c:
                t0 = time.monotonic()
                resp = c.post("/rollout", json={"image": _b64(1)[0], "format": "json"})
                beside = time.monotonic() - t0
            assert resp.status_code == 200, resp.text
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)  # the premise: the huge request still runs, no byte of its answer yet
            assert beside < 10 + 5 * alone, f"the small request took {beside:.1f} s beside the huge one " \
                                            f"({alone:.2f} s alone)"
        # leaving closes the huge request's connection: its work stops (the disconnect tests above)
