"""Recorded once, before param=fourier existed, with the recipe of the time (now param=pixel):
a 32 x 32 corner of each answer's pixels, their per-channel sums and the objective per step.
tests/test_activation_max.py checks that param=pixel still answers these. Run from the repo root:
PYTHONPATH=. python tests/data/record_activation_max_pixel.py (it overwrites the record)."""
import numpy as np
import torch

from service.engine.engine import Engine
from service.methods import job
from tests.conftest import make_model, smooth_image

torch.set_num_threads(1)
engine = Engine(make_model("vit_small_patch32_224", seed=2), torch.device("cpu"))
CASES = [dict(target="class", category_id=5, seed=3, jitter=6, tv_weight=2.0),
         dict(target="features", layer=4, channel=9, seed=4, l2_weight=0.5),
         dict(target="q", layer=2, head=1, channel=3, seed=5, lr=0.1),
         dict(target="k", layer=7, head=0, channel=30, seed=6, jitter=3)]
out = {}
for i, c in enumerate(CASES):
    j = job("activation-max", steps=5, **c)
    start = np.asarray(smooth_image(40 + i)) if i == 3 else None
    s = j.method.start(j.params, start, engine.shape)
    for _ in range(5):
        engine.step([s], [j])
    out[f"corner{i}"] = s.pixels[:, 96:128, 96:128].numpy()
    out[f"sums{i}"] = s.pixels.double().sum(dim=(1, 2)).numpy()
    out[f"objective{i}"] = np.array(s.objective)
    print(i, s.objective)
np.savez_compressed("tests/data/activation_max_pixel.npz", **out)
