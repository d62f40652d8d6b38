"""How far a large JPEG's map moves from the full-decode path: `python -m bench.decode_drift`.

The service decodes a JPEG much larger than the model's input at a reduced DCT scale (service/
imaging.py, DRAFT_MARGIN); the reference path decodes it whole and resizes it once. Printed: the
largest and median change of the rollout and gradient-rollout masks (each in [0, 1]) of the demo
model over photograph-like JPEGs, for margins 1 and 2, next to the change that re-saving the same
photograph at JPEG quality 85 instead of 90 makes on the full-decode path.
"""
import io

import numpy as np
import timm
import torch
from PIL import Image

from service import imaging
from service.config import SHAPES_VIT
from service.engine.runner import Engine
from service.methods import job
from tests.conftest import photo, jpeg_bytes
m = timm.create_model(f"local-dir:{SHAPES_VIT}", pretrained=True).eval()
e = Engine(m, torch.device("cpu"))
jobs = {"rollout": job("rollout", format="json"), "grad-rollout": job("grad-rollout", category_id=0, format="json")}
t = imaging.Target((224, 224), Image.Resampling.BILINEAR)
for margin in (1, 2):
    imaging.DRAFT_MARGIN = margin
    worst = {k: [] for k in jobs}
    for size in ((4000, 3000), (3000, 4000), (1920, 1280), (1200, 900)):
        for seed in range(3):
            data = jpeg_bytes(photo(size, seed=seed))
            d = imaging.prepare(data, 10**9, t)
            full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR))
            for k, j in jobs.items():
                a, b = e.run(torch.from_numpy(np.stack([d.pixels, full])), [j, j])
                worst[k].append(np.abs(a.maps - b.maps).max())
    print("margin", margin, {k: (f"max {max(v):.4f}", f"median {np.median(v):.4f}") for k, v in worst.items()})
imaging.DRAFT_MARGIN = 2
v = []
for size in ((4000, 3000), (1920, 1280)):
    for seed in range(3):
        img = photo(size, seed=seed)
        a = np.asarray(Image.open(io.BytesIO(jpeg_bytes(img, 90))).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR))
        b = np.asarray(Image.open(io.BytesIO(jpeg_bytes(img, 85))).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR))
        r1, r2 = e.run(torch.from_numpy(np.stack([a, b])), [jobs["rollout"]] * 2)
        v.append(np.abs(r1.maps - r2.maps).max())
print("re-saved at quality 85 instead of 90, full decode both: rollout max", f"{max(v):.4f}", "median", f"{np.median(v):.4f}")
