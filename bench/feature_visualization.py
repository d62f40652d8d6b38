"""`python -m bench.feature_visualization [--photos DIR]`: how good activation maximization's pictures are.

For MLP hidden units of a middle block of the demo model (service/demo/shapes-vit, the best-trained
model available offline), each recipe maximises every unit through the service's own engine and
method, and this script measures, with b the unit's mean over a set of natural pictures and their
crops (the model's scenes, and the photos in --photos if given):

    (a) robustness  (mean objective under 16 held-out transforms - b) / (objective - b); the
                    transforms: shift <= 16 px, scale 0.85-1.15, rotation <= 10 degrees, reflected
    (b) drive       (objective - b) / (best natural crop - b): >= 1 drives the unit at least as hard
    (c) HF ratio    the picture's share of luminance power above 0.25 cycles/pixel, over the natural
                    photos' mean share (--photos; the scenes' when none are given)

and the service's own `robustness` (b = the starting picture's objective). Prints a markdown table
(docs/feature-visualization.md). Photos: any folder of JPEG/PNG files; the figures in the docs used
the five colour photographs that ship in scikit-image's wheel (astronaut.png, chelsea.png, coffee.png,
motorcycle_left.png, rocket.jpg; `pip download scikit-image --no-deps`, unzip them from skimage/data/).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import timm
import torch
from PIL import Image

from demo import scenes
from service.engine.engine import Engine
from service.methods import activation_max as am
from service.methods import job
from service.methods import transforms as tf

DEMO = Path(__file__).resolve().parents[1] / "service" / "demo" / "shapes-vit"
SIZE = 224

RECIPES = {  # name -> (parametrisation of param=fourier, parameters)
    "pixel, today's defaults (100 steps)": (None, dict(param="pixel", steps=100)),
    "pixel, jitter 8, tv 0.5": (None, dict(param="pixel", steps=100, jitter=8, tv_weight=0.5)),
    "lucid 1/f, 4 copies, 128 steps": ("lucid", dict(param="fourier", copies=4, steps=128)),
    "phase 1/f^1.5, 1 copy, 128 steps": ("phase", dict(param="fourier", copies=1, steps=128)),
    "phase 1/f^1.5, 4 copies, 64 steps (default)": ("phase", dict(param="fourier", copies=4, steps=64)),
    "phase 1/f^1.5, 4 copies, 128 steps": ("phase", dict(param="fourier", copies=4, steps=128)),
    "phase 1/f^1.5, 4 copies, 128 steps, lr 0.1": ("phase", dict(param="fourier", copies=4, steps=128, lr=0.1)),
    "phase 1/f^1.5, 4 copies, 64 steps, lr 0.1": ("phase", dict(param="fourier", copies=4, steps=64, lr=0.1)),
    "the defaults": ("phase", {}),
}


def unit_values(model: torch.nn.Module, layer: int, channels: list[int], pixels: torch.Tensor) -> torch.Tensor:
    """pixels (B, 3, H, W) in [0, 1] -> (B, units): each MLP hidden unit of `layer` before its
    activation, averaged over the patch tokens (hooked here, not through the service's capture)."""
    cfg = model.pretrained_cfg
    mean, std = torch.tensor(cfg["mean"])[:, None, None], torch.tensor(cfg["std"])[:, None, None]
    out = {}
    hook = model.blocks[layer].mlp.fc1.register_forward_hook(lambda m, i, o: out.setdefault("h", o))
    try:
        with torch.no_grad():
            model((pixels - mean) / std)
    finally:
        hook.remove()
    return out["h"][:, model.num_prefix_tokens :, channels].mean(dim=1)


def luminance_hf_share(pixels: torch.Tensor, cutoff: float = 0.25) -> float:
    """(3, H, W) in [0, 1] -> the share of the luminance's power (mean removed) above `cutoff` cycles/pixel."""
    y = 0.299 * pixels[0] + 0.587 * pixels[1] + 0.114 * pixels[2]
    power = torch.fft.fft2(y.double() - y.double().mean()).abs() ** 2
    fy = torch.fft.fftfreq(y.shape[0], dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(y.shape[1], dtype=torch.float64)[None, :]
    high = (fy**2 + fx**2).sqrt() > cutoff
    return float(power[high].sum() / power.sum())


def to_pixels(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).clamp(0, 1)


def crops(img: Image.Image, rng: np.random.Generator, n: int = 4) -> list[torch.Tensor]:
    """The centre square and n random squares of 50-100% of the short side, at SIZE."""
    w, h = img.size
    side = min(w, h)
    out = [to_pixels(img.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)))]
    for _ in range(n):
        s = int(side * rng.uniform(0.5, 1.0))
        x0, y0 = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        out.append(to_pixels(img.crop((x0, y0, x0 + s, y0 + s))))
    return out


def natural(photos: Path | None, n_scenes: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """-> (every natural crop, the photos' centre crops (the scenes' when there are no photos))."""
    rng = np.random.default_rng(0)
    pictures = [scenes.make_scene(scenes.scene_rng(777, i))[0] for i in range(n_scenes)]
    files = sorted(p for p in (photos.iterdir() if photos else []) if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    photo_imgs = [Image.open(p) for p in files]
    everything = [c for img in pictures + photo_imgs for c in crops(img, rng)]
    reference = [crops(img, rng, 0)[0] for img in (photo_imgs or pictures)]
    return everything, reference


def ascend(engine: Engine, jobs: list) -> list:
    states = [j.method.start(j.params, None, engine.shape) for j in jobs]
    for _ in range(jobs[0].method.steps(jobs[0].params)):
        engine.step(states, jobs)
    return states


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.feature_visualization", description=__doc__)
    p.add_argument("--photos", type=Path, help="a folder of natural photos (JPEG/PNG)")
    p.add_argument("--layer", type=int, default=2, help="block of the MLP units (the demo model has 4)")
    p.add_argument("--units", type=int, default=6, help="how many MLP units (seeded choice)")
    p.add_argument("--scenes", type=int, default=24, help="demo scenes in the natural set")
    p.add_argument("--recipes", help="comma-separated indices into the recipe list (default: all)")
    p.add_argument("--save", type=Path, help="write each recipe's pictures side by side as PNGs here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared CPU)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(f"local-dir:{DEMO}", pretrained=True).eval()
    engine = Engine(model, torch.device("cpu"), name="shapes-vit")
    channels = sorted(np.random.default_rng(1).choice(engine.shape.mlp_dim, args.units, replace=False).tolist())
    everything, reference = natural(args.photos, args.scenes)
    nat = torch.cat([unit_values(model, args.layer, channels, torch.stack(everything[i:i + 32]))
                     for i in range(0, len(everything), 32)])  # (crops, units)
    b, best = nat.mean(dim=0), nat.max(dim=0).values
    hf_nat = statistics.mean(luminance_hf_share(x) for x in reference)
    print(f"shapes-vit, block {args.layer} MLP units {channels}; {len(everything)} natural crops; "
          f"natural HF share {hf_nat:.4f} ({'photos' if args.photos else 'scenes'}), "
          f"scenes {statistics.mean(luminance_hf_share(x) for x in everything[:5 * args.scenes]):.4f}")
    print("| recipe | s per unit | (a) robustness, min / median | (b) drive, min / median | "
          "(c) HF ratio, median / max | service robustness, median |")
    print("|---|---:|---:|---:|---:|---:|")
    chosen = list(RECIPES.items())
    if args.recipes:
        chosen = [chosen[int(i)] for i in args.recipes.split(",")]
    for name, (fourier, params) in chosen:
        if fourier:
            am.FOURIER = fourier
        jobs = [job("activation-max", target="mlp", layer=args.layer, channel=c, **params) for c in channels]
        t0 = time.perf_counter()
        states = ascend(engine, jobs)
        seconds = (time.perf_counter() - t0) / len(jobs)
        finals = torch.stack([s.pixels for s in states])
        obj = unit_values(model, args.layer, channels, finals).diagonal()  # (units,)
        held = torch.stack([unit_values(model, args.layer, channels, tf.held_out(s.pixels))[:, i].mean()
                            for i, s in enumerate(states)])
        a = ((held - b) / (obj - b)).tolist()
        d = ((obj - b) / (best - b)).tolist()
        c = [luminance_hf_share(s.pixels) / hf_nat for s in states]
        service = [s.robustness for s in states if s.robustness is not None]
        print(f"| {name} | {seconds:.1f} | {min(a):.2f} / {statistics.median(a):.2f} | "
              f"{min(d):.2f} / {statistics.median(d):.2f} | {statistics.median(c):.2f} / {max(c):.2f} | "
              f"{statistics.median(service) if service else float('nan'):.2f} |", flush=True)
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            row = (torch.cat(list(finals), dim=2).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
            slug = "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")
            Image.fromarray(row).save(args.save / f"{slug}.png")
    am.FOURIER = "phase"


if __name__ == "__main__":
    main()
