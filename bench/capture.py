"""The capture's cost: engine rollout against the bare forward, one thread, per family (timm, and the
`transformers` families when it is installed: against the same weights with transformers' own SDPA attention).

`python -m bench.capture [--batch 16] [--reps 10] [--families deit,eva02,...]`

For each family, a seeded random-weight model at 224 px (DeiT-Tiny; the others tiny-sized), and,
interleaved one repetition at a time (bench/inprocess.py's time_cases):

  bare      timm forward under inference_mode, fused attention as shipped
  rollout   Engine.run(x, [job("rollout")] * B): the forward with every block's attention captured
            through its adapter and reduced as it is made (max fusion, discard 0.9), then the maps

The issue's target: rollout >= 0.95x bare (in images per second) on DeiT-Tiny, batch 16, one thread.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm
import torch

from bench.inprocess import bare_case, make_images, rollout_case
from service.engine.engine import Engine

# family -> (timm name, arguments): real depth and width of the tiny models, 224 px
FAMILIES = {
    "deit": ("deit_tiny_patch16_224", {}),
    # bench/path.py's near-zero model (one block of embed 48): the capture's fixed cost per request
    "near-zero": ("vit_tiny_patch16_224", {"depth": 1, "embed_dim": 48, "num_heads": 3}),
    "vit-avg": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}),
    "vit-map": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "map"}),
    "eva02": ("eva02_tiny_patch14_224", {"num_classes": 1000}),
    "beit": ("beit_base_patch16_224", {"embed_dim": 192, "num_heads": 3}),
}


# -- transformers families (service/hf_models.py): engine rollout against the model's own SDPA forward ----------
# family -> (transformers model class, config class, config arguments): DeiT-Tiny's depth and width, 224 px
TRANSFORMERS = {
    "hf-vit": ("ViTForImageClassification", "ViTConfig", {}),
    "hf-deit-teacher": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", {}),
    "hf-beit": ("BeitForImageClassification", "BeitConfig", {"use_relative_position_bias": True}),
    "hf-dinov2": ("Dinov2ForImageClassification", "Dinov2Config", {"mlp_ratio": 4}),
}


def transformers_models(family: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the service's model, loaded from a save_pretrained folder as `transformers:` loads it; the same weights
    with transformers' SDPA attention, wrapped to answer logits): the bare forward to compare with."""
    import tempfile

    import transformers

    from service import models

    cls, config, kwargs = TRANSFORMERS[family]
    size = dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, image_size=224, patch_size=16,
                num_labels=1000)
    if "mlp_ratio" not in kwargs:
        size["intermediate_size"] = 768
    torch.manual_seed(0)
    hf = getattr(transformers, cls)(getattr(transformers, config)(**size, **kwargs)).eval()
    folder = tempfile.mkdtemp(prefix="bench-hf-")
    hf.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    served = models.create(models.ModelSpec.parse(f"transformers:{folder}"))
    bare = copy.deepcopy(served)
    bare.hf.set_attn_implementation("sdpa")
    return served, bare


def measure(family: str, batch: int, reps: int, log=print) -> dict:
    if family in TRANSFORMERS:
        model, bare = transformers_models(family)
    else:
        name, kwargs = FAMILIES[family]
        torch.manual_seed(0)
        model = bare = timm.create_model(name, pretrained=False, **kwargs).eval()
    engine = Engine(copy.deepcopy(model), torch.device("cpu"))
    size = engine.input_size[0]
    cases = {"bare": bare_case(bare), "rollout": rollout_case(engine)}
    figs = interleaved(cases, make_images(batch, size=size), reps)
    out = {"bare": figs["bare"], "rollout": figs["rollout"]}
    for clock in ("wall", "cpu"):
        out[f"ratio_{clock}"] = figs["bare"][clock] / figs["rollout"][clock]  # throughput ratio rollout / bare
    log(f"  {family:<8} batch {batch}: per batch, medians of {reps}: bare {figs['bare']['wall']:7.1f} ms wall "
        f"{figs['bare']['cpu']:7.1f} ms CPU; rollout {figs['rollout']['wall']:7.1f} ms wall "
        f"{figs['rollout']['cpu']:7.1f} ms CPU; rollout/bare throughput {out['ratio_wall']:.3f} (wall), "
        f"{out['ratio_cpu']:.3f} (CPU)")
    return out


def interleaved(cases: dict, x: torch.Tensor, reps: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    """Median wall and thread-CPU milliseconds per batch of every case, the cases taking turns one
    repetition at a time. The CPU clock is the one to read on a shared machine: with one thread it
    counts this work alone, not the time other processes held the core."""
    for fn in cases.values():
        for _ in range(warmup):
            fn(x)
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for k, fn in cases.items():
            w0, c0 = time.perf_counter(), time.thread_time()
            fn(x)
            cpu[k].append(time.thread_time() - c0)
            wall[k].append(time.perf_counter() - w0)
    return {k: {"wall": statistics.median(wall[k]) * 1e3, "cpu": statistics.median(cpu[k]) * 1e3} for k in cases}


def _has_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def run(fams: list[str], batch: int, reps: int, threads: int = 1, log=print) -> dict[str, dict]:
    """{family: figures} at one batch size, on `threads` intra-op threads (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return {f: {"batch": batch, **measure(f, batch, reps, log)} for f in fams}
    finally:
        torch.set_num_threads(before)


def render(figs: dict[str, dict]) -> list[str]:
    """Part F of results.md: one row per family."""
    lines = ["", "## The capture per family: engine rollout / its own bare forward, one thread (part F)", "",
             "| family | batch | bare ms (wall / CPU) | rollout ms (wall / CPU) | ratio (wall / CPU) |",
             "|---|---:|---:|---:|---:|"]
    for fam, f in figs.items():
        lines.append(f"| {fam} | {f['batch']} | {f['bare']['wall']:.1f} / {f['bare']['cpu']:.1f} | "
                     f"{f['rollout']['wall']:.1f} / {f['rollout']['cpu']:.1f} | "
                     f"{f['ratio_wall']:.3f} / {f['ratio_cpu']:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.capture", description=__doc__)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--families", default=",".join([*FAMILIES, *(TRANSFORMERS if _has_transformers() else ())]))
    args = p.parse_args(argv)
    print(f"capture cost, {args.threads} thread(s), torch {torch.__version__}, timm {timm.__version__}")
    run(args.families.split(","), args.batch, args.reps, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
