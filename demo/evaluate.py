"""`make eval`: how well each method points at the right thing, measured on held-out scenes.

Runs the service's own engine on the bundled `shapes-vit` over generated scenes whose object
masks are known, and writes a markdown table and a picture grid:

- accuracy: top-1 on single-object scenes;
- pointing game: the map's highest cell lies on the object (the object covers at least a
  quarter of that cell). Rollout and the baselines on single-object scenes; gradient rollout on
  two-object scenes, asked once per object's class, scored against that object;
- mIoU: each map thresholded at its mean against the object's patch mask (cells at least half
  covered), on single-object scenes;
- deletion / insertion AUC: grey out (or reveal) patches from most to least relevant and
  average the true class's probability over the steps (lower deletion, higher insertion is
  better), against a random-map baseline.

    python -m demo.evaluate [--n 200] [--seed 424242] [--out docs/eval]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image, ImageDraw

from demo.scenes import CLASS_NAMES, make_scene, scene_rng
from service import imaging
from service.config import SHAPES_VIT
from service.engine.contract import Job
from service.engine.engine import Engine
from service.methods import job as make_job
from service.models import Preprocess

EVAL_SEED = 424_242  # never used for training
FUSIONS = ("mean", "max", "min")
RATIOS = (0.0, 0.5, 0.9, 0.99)
STEPS = 8  # deletion / insertion curve points after the start
BATCH = 32


@dataclass
class Scene:
    image: Image.Image
    x: torch.Tensor  # (3, H, W) preprocessed
    objects: list[tuple[int, np.ndarray]]  # (class id, patch coverage (gh, gw) in [0, 1])


def load(path: Path = SHAPES_VIT) -> tuple[Engine, Preprocess]:
    model = timm.create_model(f"local-dir:{path}", pretrained=True)
    return Engine(model, torch.device("cpu")), Preprocess.from_model(model)


def coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Pixel mask (H, W) -> share of each patch the object covers, (gh, gw)."""
    gh, gw = grid
    h, w = mask.shape
    return mask.reshape(gh, h // gh, gw, w // gw).mean(axis=(1, 3))


def model_input(engine: Engine, pre: Preprocess, img: Image.Image) -> torch.Tensor:
    """The service's preprocessing of one image: its resize (pre) and the engine's normalisation -> (3, H, W)."""
    return engine.prepare(torch.from_numpy(pre(img))[None])[0]


def make_scenes(n: int, n_objects: int, seed: int, pre: Preprocess, engine: Engine) -> list[Scene]:
    out = []
    for i in range(n):
        img, objects = make_scene(scene_rng(seed, i), n_objects)
        out.append(Scene(img, model_input(engine, pre, img), [(c, coverage(m, engine.grid)) for c, m in objects]))
    return out


def run_jobs(engine: Engine, xs: list[torch.Tensor], jobs: list[Job]):
    results = []
    for i in range(0, len(xs), BATCH):
        results += engine.run(torch.stack(xs[i : i + BATCH]), jobs[i : i + BATCH])
    return results


# -- metrics on one map ---------------------------------------------------------------------------
def hit(m: np.ndarray, cover: np.ndarray) -> bool:
    return bool(cover.flat[int(np.argmax(m))] >= 0.25)


def iou(m: np.ndarray, cover: np.ndarray) -> float:
    pred, gt = m > m.mean(), cover >= 0.5
    union = (pred | gt).sum()
    return float((pred & gt).sum() / union) if union else 0.0


def _curves(engine: Engine, scenes: list[Scene], maps: list[np.ndarray], labels: list[int]) -> tuple[float, float]:
    """Mean deletion and insertion AUC of the true class's probability over the scenes."""
    gh, gw = engine.grid
    ph, pw = (s // g for s, g in zip(scenes[0].x.shape[1:], engine.grid))
    n = gh * gw
    counts = [round(k * n / STEPS) for k in range(STEPS + 1)]
    dele, ins = [], []
    for kind, out in (("deletion", dele), ("insertion", ins)):
        xs, owners = [], []
        for si, (scene, m) in enumerate(zip(scenes, maps)):
            order = np.argsort(-m.ravel(), kind="stable")
            for c in counts:
                keep = np.ones(n, bool) if kind == "deletion" else np.zeros(n, bool)
                keep[order[:c]] = kind != "deletion"
                cell = torch.from_numpy(keep.reshape(gh, gw)).repeat_interleave(ph, 0).repeat_interleave(pw, 1)
                xs.append(scene.x * cell)  # 0 in normalised space: the dataset's mean grey
                owners.append(si)
        probs = []
        with torch.inference_mode():
            for i in range(0, len(xs), 128):
                probs.append(torch.softmax(engine.model(torch.stack(xs[i : i + 128])), -1))
        p = torch.cat(probs).numpy()
        for si in range(len(scenes)):
            curve = p[si * len(counts) : (si + 1) * len(counts), labels[si]]
            out.append(float(np.trapezoid(curve, dx=1.0 / STEPS)))
    return float(np.mean(dele)), float(np.mean(ins))


# -- the report ----------------------------------------------------------------------------------
def settings() -> list[tuple[str, Job | None]]:
    """(name, job) for every method and setting; job None is the random-map baseline."""
    out: list[tuple[str, Job | None]] = []
    for f in FUSIONS:
        for r in RATIOS:
            out.append((f"rollout {f} r={r}", make_job("rollout", head_fusion=f, discard_ratio=r)))
    for f in FUSIONS:
        for r in RATIOS:
            out.append((f"grad-rollout {f} r={r}",
                        make_job("grad-rollout", category_id=0, head_fusion=f, discard_ratio=r)))
    out.append(("last-layer attention (mean of heads)", make_job("attention", head="mean")))
    out.append(("random map", None))
    return out


def _maps_for(engine: Engine, scenes: list[Scene], job: Job | None, classes: list[int], rng) -> list[np.ndarray]:
    if job is None:
        return [rng.random(engine.grid) for _ in scenes]
    if job.method.name == "grad-rollout":
        jobs = [Job(job.method, job.params.model_copy(update={"category_id": c})) for c in classes]
    else:
        jobs = [job] * len(scenes)
    res = run_jobs(engine, [s.x for s in scenes], jobs)
    return [r.maps[-1] if job.method.name == "attention" else r.maps for r in res]


def evaluate(n: int, seed: int, engine: Engine, pre: Preprocess, curves: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    singles = make_scenes(n, 1, seed, pre, engine)
    pairs = make_scenes(n, 2, seed + 1, pre, engine)
    truth = [s.objects[0][0] for s in singles]
    preds = run_jobs(engine, [s.x for s in singles], [make_job("rollout")] * len(singles))
    accuracy = float(np.mean([r.predictions[0].class_id == t for r, t in zip(preds, truth)]))
    # Two-object scenes, each asked once per object: flatten to (scene, object) pairs.
    pair_scenes = [s for s in pairs for _ in s.objects]
    pair_classes = [c for s in pairs for c, _ in s.objects]
    pair_covers = [cov for s in pairs for _, cov in s.objects]
    rows = []
    for name, job in settings():
        row: dict = {"setting": name}
        single_maps = _maps_for(engine, singles, job, truth, rng)
        row["pointing (1 object)"] = float(np.mean([hit(m, s.objects[0][1]) for m, s in zip(single_maps, singles)]))
        row["mIoU (1 object)"] = float(np.mean([iou(m, s.objects[0][1]) for m, s in zip(single_maps, singles)]))
        pair_maps = _maps_for(engine, pair_scenes, job, pair_classes, rng)
        row["pointing per class (2 objects)"] = float(np.mean([hit(m, c) for m, c in zip(pair_maps, pair_covers)]))
        if curves:
            row["deletion AUC"], row["insertion AUC"] = _curves(engine, singles, single_maps, truth)
        rows.append(row)
    return {"n": n, "seed": seed, "accuracy": accuracy, "rows": rows}


def to_markdown(report: dict) -> str:
    cols = [c for c in report["rows"][0] if c != "setting"]
    lines = [
        f"Held-out generated scenes, seed {report['seed']}: {report['n']} single-object and {report['n']} "
        f"two-object scenes; model `shapes-vit`; top-1 accuracy on single-object scenes "
        f"**{report['accuracy']:.3f}**.",
        "",
        "| setting | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for row in report["rows"]:
        lines.append(f"| {row['setting']} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def picture_grid(engine: Engine, pre: Preprocess, seed: int, rows: int = 4) -> Image.Image:
    """Per two-object scene: the image, rollout (max, 0.9), gradient rollout for each object's
    class (mean, 0.9), and the last layer's class-token attention."""
    tile, pad, head = 160, 4, 18
    titles = ["image", "rollout max 0.9", "grad-rollout: object A", "grad-rollout: object B", "last-layer attention"]
    sheet = Image.new("RGB", (len(titles) * (tile + pad), head + rows * (tile + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, t in enumerate(titles):
        draw.text((j * (tile + pad) + 2, 2), t, fill="black")
    for i in range(rows):
        img, objects = make_scene(scene_rng(seed + 7, i), 2)
        x = model_input(engine, pre, img)
        (c0, _), (c1, _) = objects
        jobs = [make_job("rollout"), make_job("grad-rollout", category_id=c0), make_job("grad-rollout", category_id=c1),
                make_job("attention", head="mean")]
        res = engine.run(torch.stack([x] * 4), jobs)
        maps = [res[0].maps, res[1].maps, res[2].maps, res[3].maps[-1]]
        small = img.resize((tile, tile))
        tiles = [small] + [Image.fromarray(imaging.overlay(small, m)) for m in maps]
        for j, t in enumerate(tiles):
            sheet.paste(t, (j * (tile + pad), head + i * (tile + pad)))
        y = head + i * (tile + pad) + tile - 14
        draw.text((2 * (tile + pad) + 2, y), CLASS_NAMES[c0], fill="white")
        draw.text((3 * (tile + pad) + 2, y), CLASS_NAMES[c1], fill="white")
    return sheet


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="scenes of each kind")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--out", type=Path, default=Path("docs/eval"))
    args = p.parse_args(argv)
    engine, pre = load()
    started = time.monotonic()
    report = evaluate(args.n, args.seed, engine, pre)
    args.out.mkdir(parents=True, exist_ok=True)
    table = to_markdown(report)
    (args.out / "report.md").write_text(
        "# Explanation quality on generated scenes\n\n"
        f"Made by `make eval` (`python -m demo.evaluate --n {args.n} --seed {args.seed}`) in "
        f"{time.monotonic() - started:.0f} s. Definitions: `demo/evaluate.py`.\n\n" + table
        + "\n![maps](grid.png)\n"
    )
    picture_grid(engine, pre, args.seed).save(args.out / "grid.png")
    print(table)


if __name__ == "__main__":
    main()
