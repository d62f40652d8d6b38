"""The example images in examples/, made deterministically from the demo scenes.

    python -m demo.examples            # writes examples/shapes.png and examples/photo.jpg

shapes.png: a 224 x 224 scene of two objects (a ring and a triangle) as the demo model
`shapes-vit` was trained on. photo.jpg: another scene (a crescent) at 1600 x 1200, with the grain
and fine texture of a photograph, saved as a camera would (JPEG quality 85), for the raw-body and
large-upload examples. The same code gives byte-identical files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from demo.scenes import make_scene, scene_rng

SEED = 2026
SHAPES = (16, 2)  # (scene index, objects): a ring and a triangle
PHOTO = (0, 1)  # a crescent
PHOTO_SIZE = (1600, 1200)  # (w, h)


def shapes() -> Image.Image:
    index, n = SHAPES
    return make_scene(scene_rng(SEED, index), n)[0]


def photo() -> Image.Image:
    """The PHOTO scene enlarged to PHOTO_SIZE, with texture at two fine scales and sensor-like noise."""
    index, n = PHOTO
    scene = make_scene(scene_rng(SEED, index), n)[0]
    w, h = PHOTO_SIZE
    img = np.asarray(scene.resize((w, h), Image.Resampling.BICUBIC), np.float32)
    rng = np.random.default_rng(SEED)
    for cells, amp in ((160, 6.0), (400, 4.0)):
        coarse = rng.uniform(-1, 1, (cells * h // w, cells, 1)).astype(np.float32)
        img = img + amp * np.asarray(
            Image.fromarray(coarse[..., 0], mode="F").resize((w, h), Image.Resampling.BICUBIC), np.float32
        )[..., None]
    img = img + rng.normal(0, 3.0, img.shape).astype(np.float32)
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("examples"), help="output folder (default: examples)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    shapes().save(args.out / "shapes.png", optimize=True)
    photo().save(args.out / "photo.jpg", quality=85, optimize=True)


if __name__ == "__main__":
    main()
