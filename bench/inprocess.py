"""Part A: the engine in this process, in images per second, next to what it is measured against.

Every case is a callable taking a batch (B, 3, H, W) and doing one batch's work; each gets its
own copy of the same seeded random-weight model, so no case sees another's hooks or settings.

  bare           timm forward under inference_mode, fused attention as shipped, no hooks
  rollout        Engine.run(x, [job("rollout")] * B)              (max fusion, discard 0.9)
  grad_rollout   Engine.run(x, [job("grad-rollout", category_id=k)] * B)
  grad_floor     forward + d(own logit)/d(attention of every block), nothing else: weights
                 frozen, unfused attention read by hooks on attn_drop, input requires grad
  fwd_full_bwd   forward + loss.backward() with every weight requiring grad (fused attention)
  naive          the post-style baseline in naive.py, one image at a time
"""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import timm
import torch
from torch import nn

from bench.naive import NaiveRollout
from service.engine.engine import Engine
from service.methods import job

ARCH = "deit_tiny_patch16_224"
SEED = 0
CATEGORY_ID = 281
CASES = ("bare", "rollout", "grad_rollout", "grad_floor", "fwd_full_bwd", "naive")

Case = Callable[[torch.Tensor], object]


def make_model(arch: str = ARCH, seed: int = SEED) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False).eval()


def make_images(batch: int, seed: int = SEED, size: int = 224) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


# -- cases ------------------------------------------------------------------------------------
def bare_case(model: nn.Module) -> Case:
    m = copy.deepcopy(model).eval().requires_grad_(False)

    def run(x: torch.Tensor):
        with torch.inference_mode():
            return m(x)

    return run


def rollout_case(engine: Engine) -> Case:
    return lambda x: engine.run(x, [job("rollout")] * x.shape[0])


def grad_rollout_case(engine: Engine, category_id: int = CATEGORY_ID) -> Case:
    return lambda x: engine.run(x, [job("grad-rollout", category_id=category_id)] * x.shape[0])


def grad_floor_case(model: nn.Module, category_id: int = CATEGORY_ID) -> Case:
    """The least work any gradient rollout must do: forward, then d logit / d attention, per image."""
    m = copy.deepcopy(model).eval().requires_grad_(False)
    maps: list[torch.Tensor] = []
    for blk in m.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda _mod, _inp, out: maps.append(out))

    def run(x: torch.Tensor):
        maps.clear()
        x = x.detach().requires_grad_(True)
        cats = torch.full((x.shape[0], 1), category_id, dtype=torch.long)
        with torch.enable_grad():
            logits = m(x)
            return torch.autograd.grad(logits.gather(1, cats).sum(), maps)

    return run


def full_backward_case(model: nn.Module, category_id: int = CATEGORY_ID) -> Case:
    """What a naive gradient method pays: forward and a full backward into every weight."""
    m = copy.deepcopy(model).eval().requires_grad_(True)

    def run(x: torch.Tensor):
        m.zero_grad(set_to_none=True)
        cats = torch.full((x.shape[0], 1), category_id, dtype=torch.long)
        with torch.enable_grad():
            m(x).gather(1, cats).sum().backward()

    return run


def naive_case(model: nn.Module) -> Case:
    return NaiveRollout(model, head_fusion="max", discard_ratio=0.9)


def build_cases(model: nn.Module) -> dict[str, Case]:
    engine = Engine(copy.deepcopy(model), torch.device("cpu"))
    return {
        "bare": bare_case(model),
        "rollout": rollout_case(engine),
        "grad_rollout": grad_rollout_case(engine),
        "grad_floor": grad_floor_case(model),
        "fwd_full_bwd": full_backward_case(model),
        "naive": naive_case(model),
    }


# -- timing -----------------------------------------------------------------------------------
# How long each in-process case is timed (time_cases' keywords), for the full and the --quick bench
TIMING = {"warmup": 2, "min_reps": 5, "min_seconds": 3.0, "max_reps": 30}
# (--quick checks the plumbing and gives rough figures: one warm-up run and one timed run per case)
TIMING_QUICK = {"warmup": 1, "min_reps": 1, "min_seconds": 0.0, "max_reps": 1}


def _figures(times: list[float], batch: int) -> dict:
    med = statistics.median(times)
    return {
        "img_s": batch / med,
        "ms_per_batch": med * 1e3,
        "ms_min": min(times) * 1e3,
        "ms_max": max(times) * 1e3,
        "reps": len(times),
    }


def time_cases(
    cases: dict[str, Case], x: torch.Tensor, warmup: int, min_reps: int, min_seconds: float, max_reps: int
) -> dict[str, dict]:
    """Median batch wall time of every case, the cases taking turns one repetition at a time.

    Interleaving puts every case under the same drift of a shared machine (on the development box
    the same batch ran up to 1.5x slower from one minute to the next), so their ratios hold even
    when the absolute figures move. Repetitions go on until each case has `min_reps` and the round
    took `min_seconds` per case on average, or `max_reps`.
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn(x)
    times: dict[str, list[float]] = {name: [] for name in cases}
    start = time.perf_counter()
    for rep in range(max_reps):
        if rep >= min_reps and time.perf_counter() - start >= min_seconds * len(cases):
            break
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t0)
    return {name: _figures(t, x.shape[0]) for name, t in times.items()}


def run_engine_bench(batches: list[int], timing: dict, log=print) -> dict:
    """{case: {batch: figures}} for every case and batch size, the cases interleaved per batch size."""
    torch.manual_seed(SEED)
    model = make_model()
    cases = build_cases(model)
    out: dict[str, dict[int, dict]] = {c: {} for c in CASES}
    for b in batches:
        figs = time_cases({name: cases[name] for name in CASES}, make_images(b), **timing)
        for name in CASES:
            fig = out[name][b] = figs[name]
            log(f"  engine  {name:<13} batch {b:>3}: {fig['img_s']:8.1f} img/s  "
                f"({fig['ms_per_batch']:.1f} ms/batch, {fig['reps']} reps)")
    return out


def run_plain_process(batch: int, timing: dict) -> dict:
    """bare and grad_floor at one batch size, timed in a fresh Python process with glibc's default
    allocator settings: the issue's own check times them that way, outside the service."""
    code = (
        "import json, sys; from bench import inprocess as b; "
        f"print(json.dumps(b._plain_figures({batch}, json.loads(sys.argv[1]))))"
    )
    done = subprocess.run([sys.executable, "-c", code, json.dumps(timing)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _plain_figures(batch: int, timing: dict) -> dict:
    model = make_model()
    x = make_images(batch)
    return time_cases({"bare": bare_case(model), "grad_floor": grad_floor_case(model)}, x, **timing)


def naive_agreement(n_images: int = 2) -> float:
    """Max |engine rollout - naive rollout| over a few images: both must give the same maps."""
    model = make_model()
    engine = Engine(copy.deepcopy(model), torch.device("cpu"))
    x = make_images(n_images, seed=SEED + 1)
    ours = np.stack([r.maps for r in engine.run(x, [job("rollout")] * n_images)])
    theirs = np.stack(naive_case(model)(x))
    return float(np.abs(ours - theirs).max())
