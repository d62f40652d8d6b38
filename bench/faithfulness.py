"""Part E: what the faithfulness option costs, against its floor of steps x 2 bare forward passes.

In process, the cases interleaved (inprocess.time_cases), on the bench's random-weight model:

  bare chunk     one timm forward of a chunk of images (the engine's chunk on this device), under
                 inference_mode, fused attention as shipped: the per-image floor is its time / chunk
  rollout        Engine.run of a batch of rollout jobs, the option off
  rollout + f    the same jobs with faithfulness=True, faithfulness_steps=k
  grad-rollout   and + f: the same for gradient rollout (the autograd pass)

The option's cost per image is (with - without) / batch; the target (issue 20) is within 1.2x of
k x 2 bare forwards per image. That the option costs nothing when off is the rollout case itself:
the engine's only extra step is reading each job's flag.

    python -m bench.faithfulness [--steps 16] [--batch 4] [--device cpu] [--quick]
"""

from __future__ import annotations

import argparse
import copy

import torch

from bench import inprocess
from service.engine.engine import FAITHFULNESS_CHUNK, Engine
from service.methods import job


def cost(timing: dict, steps: int = 16, batch: int = 4, device: str = "cpu", log=print) -> dict:
    torch.manual_seed(inprocess.SEED)
    dev = torch.device(device)
    model = inprocess.make_model()
    engine = Engine(copy.deepcopy(model), dev)
    bare = copy.deepcopy(model).to(dev).eval().requires_grad_(False)
    chunk = FAITHFULNESS_CHUNK.get(dev.type, 32)
    copies = inprocess.make_images(chunk, seed=1).to(dev)
    cat = inprocess.CATEGORY_ID

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def bare_chunk(_x):
        with torch.inference_mode():
            bare(copies)
        sync()

    def run(name, **opts):
        params = {"category_id": cat} if name == "grad-rollout" else {}
        jobs = [job(name, **params, **opts)] * batch
        return lambda x: (engine.run(x, jobs), sync())

    on = {"faithfulness": True, "faithfulness_steps": steps}
    cases = {"bare chunk": bare_chunk, "rollout": run("rollout"), "rollout + f": run("rollout", **on),
             "grad-rollout": run("grad-rollout"), "grad-rollout + f": run("grad-rollout", **on)}
    figs = inprocess.time_cases(cases, inprocess.make_images(batch), **timing)
    ms = {name: fig["ms_per_batch"] for name, fig in figs.items()}
    floor = 2 * steps * ms["bare chunk"] / chunk  # ms per image
    out = {"steps": steps, "batch": batch, "chunk": chunk, "device": device, "ms_per_batch": ms,
           "floor_ms_per_image": floor}
    log(f"  floor: {steps} x 2 bare forwards = {floor:.1f} ms per image (bare, batch {chunk}: "
        f"{ms['bare chunk'] / chunk:.2f} ms per image)")
    for m in ("rollout", "grad-rollout"):
        extra = (ms[f"{m} + f"] - ms[m]) / batch
        out[m] = {"ms_per_image": ms[m] / batch, "with_ms_per_image": ms[f"{m} + f"] / batch,
                  "cost_ms_per_image": extra, "ratio_to_floor": extra / floor}
        log(f"  {m:<13} {ms[m] / batch:7.1f} ms per image; with faithfulness {ms[f'{m} + f'] / batch:7.1f}: "
            f"+{extra:.1f} ms = {extra / floor:.2f} x the floor")
    return out


def targets(f: dict | None) -> list[dict]:
    """The option's cost per image over its floor of steps x 2 bare forwards: at most 1.2x."""
    rows = []
    for m in ("rollout", "grad-rollout"):
        value = f[m]["ratio_to_floor"] if f else None
        rows.append({"name": f"faithfulness cost / {f['steps'] if f else 'k'} x 2 bare forwards ({m})", "value": value,
                     "threshold": 1.2, "kind": "<=", "unit": "x", "pass": None if value is None else value <= 1.2})
    return rows


def render(f: dict) -> list[str]:
    lines = ["", f"## Faithfulness ({f['steps']} steps), in process, batch {f['batch']}, {f['device']} "
                 f"(ms per image)", "",
             f"Floor: {f['steps']} x 2 bare forwards at batch {f['chunk']} = "
             f"{f['floor_ms_per_image']:.1f} ms per image.",
             "", "| | option off | option on | its cost | cost / floor (target <= 1.2) |", "|---|---:|---:|---:|---:|"]
    for m in ("rollout", "grad-rollout"):
        r = f[m]
        lines.append(f"| {m} | {r['ms_per_image']:.1f} | {r['with_ms_per_image']:.1f} | {r['cost_ms_per_image']:.1f} "
                     f"| {r['ratio_to_floor']:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faithfulness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    f = cost(inprocess.TIMING_QUICK if args.quick else inprocess.TIMING, args.steps, args.batch, args.device)
    print("\n".join(render(f)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
