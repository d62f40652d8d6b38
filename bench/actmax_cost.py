"""Part G: what a step of activation maximization costs, against copies x one forward and backward.

In process, the cases interleaved (inprocess.time_cases), on the bench's random-weight DeiT-Tiny:

  fwd+bwd c      one timm forward of c images and the backward to the input (the weights frozen):
                 the floor of a step with c copies
  fourier c      Engine.step of one session, param=fourier, copies=c, target=class (the Fourier
                 image, the c transforms, the pass, the backward through transforms and FFT, Adam;
                 a class logit, so that the backward goes as far as the floor's)
  pixel          Engine.step of one session, param=pixel (one picture)

and the expected time of the default recipe: steps x (fourier at the default copies) + the
robustness pass (fwd+bwd of 18 pictures).

    python -m bench.actmax_cost [--copies 1,2,4,8] [--device cpu] [--quick]
"""

from __future__ import annotations

import argparse
import copy

import torch

from bench import inprocess
from service.engine.engine import Engine
from service.methods import activation_max as am
from service.methods import job


def cost(timing: dict, copies: tuple[int, ...] = (1, 2, 4, 8), device: str = "cpu", log=print) -> dict:
    torch.manual_seed(inprocess.SEED)
    dev = torch.device(device)
    model = inprocess.make_model()
    engine = Engine(copy.deepcopy(model), dev)
    bare = copy.deepcopy(model).to(dev).eval().requires_grad_(False)
    defaults = am.ActivationMaxParams()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def floor(c):
        x = inprocess.make_images(c, seed=1).to(dev)

        def run(_x):
            xi = x.detach().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(bare(xi)[:, 0].sum(), xi)
            sync()

        return run

    def step(**params):
        j = job("activation-max", target="class", category_id=inprocess.CATEGORY_ID, steps=1000, **params)
        state = j.method.start(j.params, None, engine.shape)

        def run(_x):
            engine.step([state], [j])
            sync()

        return run

    cases = {f"fwd+bwd {c}": floor(c) for c in sorted({*copies, am.EVAL_ROWS})}
    cases |= {f"fourier {c}": step(copies=c) for c in copies}
    cases["pixel"] = step(param="pixel")
    figs = inprocess.time_cases(cases, inprocess.make_images(1), **timing)
    ms = {name: fig["ms_per_batch"] for name, fig in figs.items()}
    out = {"device": device, "copies": list(copies), "ms": ms, "default_steps": defaults.steps,
           "default_copies": defaults.copies}
    for c in copies:
        step_ms, floor_ms = ms[f"fourier {c}"], ms[f"fwd+bwd {c}"]
        log(f"  copies {c}: step {step_ms:7.1f} ms, fwd+bwd at batch {c}: {floor_ms:7.1f} ms "
            f"= {step_ms / floor_ms:.2f} x")
    log(f"  pixel: step {ms['pixel']:.1f} ms, fwd+bwd 1: {ms['fwd+bwd 1']:.1f} ms")
    if defaults.copies in copies:
        out["default_s"] = (defaults.steps * ms[f"fourier {defaults.copies}"] + ms[f"fwd+bwd {am.EVAL_ROWS}"]) / 1e3
        log(f"  the default recipe ({defaults.steps} steps x {defaults.copies} copies + the robustness pass): "
            f"{out['default_s']:.1f} s")
    return out


def render(f: dict) -> list[str]:
    ms = f["ms"]
    lines = ["", f"## Activation maximization's step, in process, DeiT-Tiny, {f['device']} (ms)", "",
             "| copies | step (param=fourier) | fwd+bwd of copies images | step / floor |", "|---:|---:|---:|---:|"]
    for c in f["copies"]:
        lines.append(f"| {c} | {ms[f'fourier {c}']:.1f} | {ms[f'fwd+bwd {c}']:.1f} | "
                     f"{ms[f'fourier {c}'] / ms[f'fwd+bwd {c}']:.2f} |")
    lines += ["", f"param=pixel: {ms['pixel']:.1f} ms per step (fwd+bwd of 1: {ms['fwd+bwd 1']:.1f} ms)."]
    if "default_s" in f:
        lines.append(f"The default recipe ({f['default_steps']} steps x {f['default_copies']} copies and the "
                     f"robustness pass): {f['default_s']:.1f} s.")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.actmax_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", default="1,2,4,8")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    timing = inprocess.TIMING_QUICK if args.quick else inprocess.TIMING
    f = cost(timing, tuple(int(c) for c in args.copies.split(",")), args.device)
    print("\n".join(render(f)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
