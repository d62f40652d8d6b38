"""How far a large JPEG's map moves from the full-decode path: `python -m bench.decode_drift`.

The service decodes a JPEG much larger than the model's input at a reduced DCT scale (service/
imaging.py, DRAFT_MARGIN); the reference path decodes it whole and resizes it once to the input
size. Printed: the largest and median change of the rollout and gradient-rollout masks (each in
[0, 1]) of the demo model over photo-like JPEGs (bench/path.py), for margins 1 and 2, next to
the change that re-saving the same photograph at JPEG quality 85 instead of 90 makes on the
full-decode path.
"""

from __future__ import annotations

import io

import numpy as np
import timm
import torch
from PIL import Image

from bench.path import photo_jpeg
from service import imaging
from service.config import SHAPES_VIT
from service.engine.engine import Engine
from service.methods import job

SIZES = ((4000, 3000), (3000, 4000), (1920, 1280), (1200, 900))
SEEDS = range(3)
BILINEAR = Image.Resampling.BILINEAR  # the demo model's interpolation


def full_path(data: bytes) -> np.ndarray:
    """The reference: the whole JPEG decoded, then one resize to the input size."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224), BILINEAR))


def main() -> None:
    model = timm.create_model(f"local-dir:{SHAPES_VIT}", pretrained=True).eval()
    engine = Engine(model, torch.device("cpu"))
    jobs = {"rollout": job("rollout", format="json"), "grad-rollout": job("grad-rollout", category_id=0, format="json")}
    target = imaging.Target((224, 224), BILINEAR)

    def change(a: np.ndarray, b: np.ndarray, j) -> float:
        ra, rb = engine.run(torch.from_numpy(np.stack([a, b])), [j, j])
        return float(np.abs(ra.maps - rb.maps).max())

    default = imaging.DRAFT_MARGIN
    for margin in (1, 2):
        imaging.DRAFT_MARGIN = margin
        moved: dict[str, list[float]] = {k: [] for k in jobs}
        for w, h in SIZES:
            for seed in SEEDS:
                data = photo_jpeg(w, h, seed=seed)
                reduced = imaging.prepare(data, 10**9, target).pixels
                for k, j in jobs.items():
                    moved[k].append(change(reduced, full_path(data), j))
        print(f"DRAFT_MARGIN {margin}: " + "; ".join(
            f"{k} max {max(v):.4f} median {np.median(v):.4f}" for k, v in moved.items()))
    imaging.DRAFT_MARGIN = default
    resaved = [change(full_path(photo_jpeg(w, h, seed=s, quality=90)), full_path(photo_jpeg(w, h, seed=s, quality=85)),
                      jobs["rollout"]) for w, h in SIZES[::2] for s in SEEDS]
    print(f"re-saved at quality 85 instead of 90, both decoded whole: rollout max {max(resaved):.4f} "
          f"median {np.median(resaved):.4f}")


if __name__ == "__main__":
    main()
