"""The batcher: size and delay flushes, one worker per replica, failures stay in their batch."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.batching import Batcher


def run(coro):
    return asyncio.run(coro)


def test_concurrent_items_are_batched_up_to_the_max_size():
    seen: list[list[int]] = []

    def work(items):
        seen.append(list(items))
        return [i * 10 for i in items]

    async def main():
        b = Batcher([work], max_batch_size=4, max_delay_ms=200)
        b.start()
        results = await asyncio.gather(*(b.submit(i) for i in range(10)))
        await b.stop()
        return results

    assert run(main()) == [i * 10 for i in range(10)]
    assert [len(s) for s in seen] == [4, 4, 2]
    assert sorted(x for s in seen for x in s) == list(range(10))


@pytest.mark.solo  # bounds a latency: after the parallel run (Makefile)
def test_a_lone_item_runs_at_once_without_waiting_for_company():
    async def main():
        b = Batcher([lambda items: items], max_batch_size=64, max_delay_ms=500)
        b.start()
        t0 = time.monotonic()
        r = await b.submit("x")
        waited = time.monotonic() - t0
        await b.stop()
        return r, waited

    r, waited = run(main())
    assert r == "x" and waited < 0.25  # nothing else was on its way: no 500 ms wait


def test_items_on_their_way_are_waited_for_up_to_max_delay():
    seen: list[list[str]] = []

    def work(items):
        seen.append(list(items))
        return items

    async def main():
        b = Batcher([work], max_batch_size=64, max_delay_ms=300)
        b.start()
        with b.arriving(2):  # two requests still decoding
            first = asyncio.ensure_future(b.submit("a"))
            await asyncio.sleep(0.05)
            second = asyncio.ensure_future(b.submit("b"))
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.05)  # both in, nothing else on its way: a and b run now
        t0 = time.monotonic()
        with b.arriving():  # announced, never submitted: the wait ends at max_delay
            third = asyncio.ensure_future(b.submit("c"))
            await asyncio.sleep(0)
            results = await asyncio.gather(first, second, third)
        waited = time.monotonic() - t0
        await b.stop()
        return results, waited

    results, waited = run(main())
    assert results == ["a", "b", "c"]
    assert seen == [["a", "b"], ["c"]]
    assert 0.25 <= waited  # "c" came to an idle worker but another request was on its way


def test_a_freed_worker_waits_for_the_clients_of_its_last_batch():
    """Closed-loop clients: what queued during a batch waits up to max_delay after the worker frees,
    so the clients whose answers just went out can rejoin the next batch (no half-size cohorts)."""
    seen: list[list[str]] = []

    def work(items):
        seen.append(list(items))
        time.sleep(0.15)
        return items

    async def main():
        b = Batcher([work], max_batch_size=8, max_delay_ms=200)
        b.start()
        first = asyncio.ensure_future(b.submit("a1"))  # comes to an idle worker: runs at once
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(b.submit(x)) for x in ("b1", "b2")]  # queue while a1 runs
        await first
        rejoin = asyncio.ensure_future(b.submit("a2"))  # a1's client is back 50 ms later
        await asyncio.sleep(0)
        results = await asyncio.gather(*queued, rejoin)
        await b.stop()
        return results

    assert run(main()) == ["b1", "b2", "a2"]
    assert seen == [["a1"], ["b1", "b2", "a2"]]


def test_a_failing_batch_fails_only_its_own_items_and_the_worker_goes_on():
    def work(items):
        if "bad" in items:
            raise RuntimeError("boom")
        return items

    async def main():
        b = Batcher([work], max_batch_size=2, max_delay_ms=1)
        b.start()
        bad = await asyncio.gather(b.submit("bad"), b.submit("neighbour"), return_exceptions=True)
        good = await b.submit("ok")
        await b.stop()
        return bad, good

    bad, good = run(main())
    assert all(isinstance(e, RuntimeError) for e in bad) and good == "ok"


def test_work_runs_off_the_event_loop_thread_on_every_replica():
    threads: set[str] = set()
    gate = threading.Barrier(2, timeout=5)

    def work(items):
        threads.add(threading.current_thread().name)
        gate.wait()  # both replicas must be busy at once, or this times out
        return items

    async def main():
        b = Batcher([work, work], max_batch_size=1, max_delay_ms=0, name="m")
        b.start()
        out = await asyncio.gather(b.submit(1), b.submit(2))
        await b.stop()
        return out

    assert run(main()) == [1, 2]
    assert len(threads) == 2 and threading.main_thread().name not in threads


def test_callers_that_gave_up_are_not_computed():
    computed = []

    def work(items):
        computed.extend(items)
        time.sleep(0.05)
        return items

    async def main():
        b = Batcher([work], max_batch_size=8, max_delay_ms=50)
        b.start()
        busy = asyncio.ensure_future(b.submit("busy"))  # keeps the worker busy while "gone" queues
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(b.submit("gone"))
        await asyncio.sleep(0.01)
        gone.cancel()
        r = await b.submit("kept")
        await busy
        await b.stop()
        return r

    assert run(main()) == "kept" and computed == ["busy", "kept"]


def test_submit_before_start_is_an_error():
    with pytest.raises(RuntimeError):
        run(Batcher([lambda i: i]).submit(1))
