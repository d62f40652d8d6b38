"""Synthetic shape scenes with pixel-exact ground truth, for the offline demo model.

Each scene is a 224x224 RGB image with one or two solid shapes (random class,
colour, size, rotation, position) on a cluttered background: colour gradients,
low-frequency blotches, stripes, pixel noise and thin distractor strokes that
belong to no shape class. The object colour is chosen to contrast with the
background under it, so the class can only be read from the object itself.

In memory::

    rng = np.random.default_rng(0)
    image, objects = make_scene(rng, n_objects=2)   # objects: [(class_id, mask), ...]

On disk::

    python -m demo.scenes --out DIR --n 100 --seed 7 --objects 2

writes DIR/00000.png, one binary mask per object (DIR/00000_0.png, ...) and
DIR/scenes.jsonl. The same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 224
"""Side of a scene in pixels."""

CLASS_NAMES: list[str] = ["circle", "square", "triangle", "star", "cross", "ring", "crescent", "arrow"]
"""Shape classes; the index is the class id (and the model's output index)."""

_SS = 4  # supersampling factor for antialiased shape edges
_MIN_CONTRAST = 110.0  # minimum RGB distance between object colour and the background under it
_GAP = 6.0  # minimum gap in pixels between the circumcircles of two objects

# Ranges of the object's circumscribed diameter in pixels.
_DIAMETER_ONE = (40.0, 110.0)
_DIAMETER_TWO = (40.0, 95.0)

Objects = list[tuple[int, np.ndarray]]
"""(class_id, mask) per object; mask is a (SIZE, SIZE) np.bool_ array."""

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1)  # (SIZE, SIZE) each, in [0, 1]


# --------------------------------------------------------------------------- shapes


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    """Vertices (n, 2) of a regular n-gon with the given circumradius."""
    t = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _star() -> np.ndarray:
    outer = _regular(5, 1.0, -np.pi / 2)
    inner = _regular(5, 0.45, -np.pi / 2 + np.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(10, 2)


_CROSS = np.array(
    [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3),
     (0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)]
) * 0.95  # arm tips at circumradius ~1
_ARROW = np.array([(-1, -0.22), (0.15, -0.22), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.22), (-1, 0.22)])
_CIRCLE = _regular(72)

# Each shape is a list of (unit polygon, fill) layers in circumradius units; fill 0 cuts a hole.
_SHAPES: dict[str, list[tuple[np.ndarray, int]]] = {
    "circle": [(_CIRCLE, 255)],
    "square": [(_regular(4, 1.0, np.pi / 4), 255)],
    "triangle": [(_regular(3, 1.0, -np.pi / 2) + (0.0, 0.25), 255)],  # centred by area
    "star": [(_star(), 255)],
    "cross": [(_CROSS, 255)],
    "ring": [(_CIRCLE, 255), (_CIRCLE * 0.6, 0)],
    "crescent": [(_CIRCLE, 255), (_CIRCLE * 0.85 + (0.45, 0.0), 0)],
    "arrow": [(_ARROW, 255)],
}
assert list(_SHAPES) == CLASS_NAMES


def _shape_alpha(class_id: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Antialiased coverage (SIZE, SIZE) uint8 of one rotated, scaled shape centred at (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, s], [-s, c]])  # row vectors: p @ rot rotates by +angle
    # Rasterise only the bounding square (x0, y0, side), supersampled, then paste it into the frame.
    x0, y0 = max(int(cx - radius) - 2, 0), max(int(cy - radius) - 2, 0)
    side = int(2 * radius) + 5
    canvas = Image.new("L", (side * _SS, side * _SS), 0)
    draw = ImageDraw.Draw(canvas)
    for poly, fill in _SHAPES[CLASS_NAMES[class_id]]:
        pts = (poly @ rot * radius + (cx - x0, cy - y0)) * _SS
        draw.polygon([tuple(p) for p in pts.tolist()], fill=fill)
    alpha = np.zeros((SIZE, SIZE), np.uint8)
    local = np.asarray(canvas.reduce(_SS))[: SIZE - y0, : SIZE - x0]
    alpha[y0 : y0 + local.shape[0], x0 : x0 + local.shape[1]] = local
    return alpha


# --------------------------------------------------------------------------- background


def _blotches(rng: np.random.Generator) -> np.ndarray:
    """Smooth low-frequency colour variation (SIZE, SIZE, 3) float32 in [-1, 1]."""
    grid = rng.integers(0, 256, (int(rng.integers(3, 7)),) * 2 + (3,), dtype=np.uint8)
    smooth = Image.fromarray(grid).resize((SIZE, SIZE), Image.BICUBIC)
    return np.asarray(smooth, dtype=np.float32) / 127.5 - 1.0


def _stripes(rng: np.random.Generator) -> np.ndarray:
    """Sine or square-wave stripes (SIZE, SIZE) float32 in [-1, 1] at a random angle and period."""
    a = rng.uniform(0, np.pi)
    freq, phase = np.float32(2 * np.pi * rng.uniform(4, 24)), np.float32(rng.uniform(0, 2 * np.pi))
    wave = np.sin(freq * (_XX * np.float32(math.cos(a)) + _YY * np.float32(math.sin(a))) + phase)
    return np.sign(wave) if rng.random() < 0.5 else wave.astype(np.float32)


def _background(rng: np.random.Generator) -> np.ndarray:
    """Cluttered background without strokes, (SIZE, SIZE, 3) float32 in [0, 255]."""
    a = rng.uniform(0, 2 * np.pi)
    t = _XX * np.float32(math.cos(a)) + _YY * np.float32(math.sin(a))
    t = (t - t.min()) / (t.max() - t.min())
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    bg = c0 + t[..., None] * (c1 - c0)  # (SIZE, SIZE, 3) linear gradient
    if rng.random() < 0.6:
        bg += np.float32(rng.uniform(10, 50)) * _blotches(rng)
    if rng.random() < 0.5:
        bg += _stripes(rng)[..., None] * rng.uniform(-1, 1, 3).astype(np.float32) * np.float32(rng.uniform(10, 45))
    return np.clip(bg, 0, 255, out=bg)


def _draw_strokes(image: Image.Image, rng: np.random.Generator) -> None:
    """Draw thin distractor lines, polylines and arcs (no closed or filled shapes) in place."""
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 11))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        width = int(rng.integers(1, 4))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.line([tuple(p) for p in rng.uniform(-20, SIZE + 20, (2, 2)).tolist()], fill=colour, width=width)
        elif kind == 1:
            steps = rng.normal(0, 30, (int(rng.integers(3, 7)), 2))
            pts = np.cumsum(steps, axis=0) + rng.uniform(0, SIZE, 2)
            draw.line([tuple(p) for p in pts.tolist()], fill=colour, width=width, joint="curve")
        else:
            cx, cy, r = *rng.uniform(0, SIZE, 2), rng.uniform(20, 120)
            start = rng.uniform(0, 360)
            draw.arc([cx - r, cy - r, cx + r, cy + r], start, start + rng.uniform(30, 200), fill=colour, width=width)


def _pick_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """An RGB colour (3,) at least _MIN_CONTRAST away from the mean colour `under` (3,), if one is found."""
    candidates = rng.uniform(0, 255, (32, 3))
    dist = np.linalg.norm(candidates - under, axis=1)
    ok = np.flatnonzero(dist >= _MIN_CONTRAST)
    return candidates[ok[0]] if ok.size else candidates[np.argmax(dist)]


# --------------------------------------------------------------------------- scenes


def _place(rng: np.random.Generator, n_objects: int) -> list[tuple[float, float, float]]:
    """Non-overlapping (cx, cy, radius) per object; circumcircles are at least _GAP apart."""
    lo, hi = _DIAMETER_ONE if n_objects == 1 else _DIAMETER_TWO
    while True:
        placed: list[tuple[float, float, float]] = []
        for _ in range(n_objects):
            r = rng.uniform(lo, hi) / 2
            for _attempt in range(50):
                cx, cy = rng.uniform(r + 2, SIZE - r - 2, 2)
                if all(math.hypot(cx - x, cy - y) >= r + q + _GAP for x, y, q in placed):
                    placed.append((cx, cy, r))
                    break
            else:
                break  # no room: start over with fresh sizes
        if len(placed) == n_objects:
            return placed


def make_scene(rng: np.random.Generator, n_objects: int = 1) -> tuple[Image.Image, Objects]:
    """Render one scene.

    Args:
        rng: source of all randomness (the scene is a pure function of its state).
        n_objects: 1 or 2; two objects always have different classes and disjoint masks.

    Returns:
        The RGB image (SIZE x SIZE) and [(class_id, mask (SIZE, SIZE) bool), ...] per object.
    """
    if n_objects not in (1, 2):
        raise ValueError(f"n_objects must be 1 or 2, got {n_objects}")
    classes = rng.choice(len(CLASS_NAMES), size=n_objects, replace=False)
    bg = _background(rng)
    canvas = Image.fromarray(bg.astype(np.uint8))
    _draw_strokes(canvas, rng)
    img = np.array(canvas, dtype=np.float32)  # (SIZE, SIZE, 3)

    objects: Objects = []
    for class_id, (cx, cy, r) in zip(classes.tolist(), _place(rng, n_objects)):
        alpha = _shape_alpha(class_id, cx, cy, r, rng.uniform(0, 2 * np.pi))  # (SIZE, SIZE) uint8
        mask = alpha >= 128
        colour = _pick_colour(rng, img[mask].mean(axis=0)).astype(np.float32)
        rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
        box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]  # composite inside the bounding box only
        a = alpha[box][..., None].astype(np.float32) / np.float32(255)
        img[box] = img[box] * (1 - a) + colour * a
        objects.append((class_id, mask))

    if rng.random() < 0.7:
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2, 18))
    img += np.float32(0.5)
    return Image.fromarray(np.clip(img, 0, 255, out=img).astype(np.uint8)), objects


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for scene `index` of a run seeded with `seed` (independent per scene)."""
    return np.random.default_rng([seed, index])


def write_scenes(out: Path, n: int, seed: int, n_objects: int = 1) -> None:
    """Write n scenes, their masks and scenes.jsonl into `out` (created if missing)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scenes.jsonl", "w") as index:
        for i in range(n):
            image, objects = make_scene(scene_rng(seed, i), n_objects)
            name = f"{i:05d}"
            image.save(out / f"{name}.png")
            records = []
            for k, (class_id, mask) in enumerate(objects):
                Image.fromarray(mask.astype(np.uint8) * 255).save(out / f"{name}_{k}.png")
                records.append({"class_id": class_id, "label": CLASS_NAMES[class_id], "mask": f"{name}_{k}.png"})
            index.write(json.dumps({"file": f"{name}.png", "objects": records}) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--n", type=int, required=True, help="number of scenes")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--objects", type=int, choices=(1, 2), default=1, help="objects per scene")
    args = parser.parse_args(argv)
    write_scenes(args.out, args.n, args.seed, args.objects)


if __name__ == "__main__":
    main()
