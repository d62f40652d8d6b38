"""The model pool: failure isolation (with an injected CUDA out-of-memory), replicas, devices."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from service.methods import job
from service.models import ModelSpec
from service.pool import ModelNotReady, ModelPool, UnknownModel, isolate_failures, resolve_devices
from tests import reference as ref
from tests.conftest import smooth_image


def test_out_of_memory_splits_the_batch_until_it_fits():
    calls = []

    def run(items):
        calls.append(len(items))
        if len(items) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return [i * 10 for i in items]

    assert isolate_failures(run, list(range(7))) == [i * 10 for i in range(7)]
    assert calls == [7, 3, 1, 2, 4, 2, 2]  # halves until every part fits


def test_a_poisoned_item_fails_alone():
    def run(items):
        if "poison" in items:
            raise ValueError("cannot explain this one")
        return [s.upper() for s in items]

    out = isolate_failures(run, ["a", "poison", "b"])
    assert out[0] == "A" and out[2] == "B" and isinstance(out[1], ValueError)


def test_out_of_memory_on_a_single_item_is_that_items_error():
    def run(items):
        raise torch.cuda.OutOfMemoryError("injected")

    (err,) = isolate_failures(run, ["x"])
    assert isinstance(err, torch.cuda.OutOfMemoryError)


def test_devices_and_dtypes_are_checked_up_front():
    assert resolve_devices("cpu") == [torch.device("cpu")]
    assert resolve_devices("auto") == [torch.device("cuda" if torch.cuda.is_available() else "cpu")]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            resolve_devices("cuda:0,cuda:1")
    with pytest.raises(ValueError, match="CUDA only"):
        ModelPool([ModelSpec.parse("x")], [torch.device("cpu")], dtype="float16")
    with pytest.raises(ValueError, match="unique"):
        ModelPool([ModelSpec.parse("a=x"), ModelSpec.parse("a=y")], [torch.device("cpu")])


@pytest.mark.slow
def test_replicas_share_one_queue_and_agree(model_dirs, models):
    spec = ModelSpec.parse(f"deit=local-dir:{model_dirs['deit_tiny_patch16_224']}")

    async def main():
        pool = ModelPool([spec], [torch.device("cpu")], replicas_per_device=2, max_batch_size=2, max_delay_ms=1)
        with pytest.raises(ModelNotReady):
            pool.get("deit")
        await pool.load_all()
        with pytest.raises(UnknownModel):
            pool.get("other")
        m = pool.get(None)
        assert len(m.engines) == 2 and m.engines[0].model is not m.engines[1].model
        x = m.preprocess(smooth_image(5))
        jobs = [job("rollout"), job("grad-rollout", category_id=3)] * 4
        out = await asyncio.gather(*(m.batcher.submit((x, j)) for j in jobs))
        await pool.close()
        return out

    out = asyncio.run(main())
    r = ref.Reference(models["deit_tiny_patch16_224"])
    c = r.run(ref.preprocess(smooth_image(5), r.model))
    cg = r.run(ref.preprocess(smooth_image(5), r.model), category=3)
    for i, res in enumerate(out):
        want = r.rollout(c) if i % 2 == 0 else r.grad_rollout(cg)
        np.testing.assert_allclose(res.maps, want, atol=5e-3)
