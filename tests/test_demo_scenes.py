"""The synthetic scene generator (demo/scenes.py) and the shipped demo model (service/demo/shapes-vit)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo import scenes
from demo.scenes import CLASS_NAMES, SIZE, make_scene, scene_rng
from service.config import SHAPES_VIT as MODEL_DIR

TEST_SEED = 4242  # not a training seed


def _write(tmp_path: Path, name: str, n: int, seed: int, objects: int) -> Path:
    out = tmp_path / name
    scenes.main(["--out", str(out), "--n", str(n), "--seed", str(seed), "--objects", str(objects)])
    return out


@pytest.mark.parametrize("n_objects", [1, 2])
def test_cli_writes_images_masks_and_index(tmp_path: Path, n_objects: int) -> None:
    out = _write(tmp_path, "s", 4, 11, n_objects)
    records = [json.loads(line) for line in (out / "scenes.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == [f"{i:05d}.png" for i in range(4)]
    for i, record in enumerate(records):
        image = Image.open(out / record["file"])
        assert (image.mode, image.size) == ("RGB", (SIZE, SIZE))
        assert len(record["objects"]) == n_objects
        for k, obj in enumerate(record["objects"]):
            assert obj["mask"] == f"{i:05d}_{k}.png"
            assert obj["label"] == CLASS_NAMES[obj["class_id"]]
            mask = Image.open(out / obj["mask"])
            assert (mask.mode, mask.size) == ("L", (SIZE, SIZE))
            values = set(np.unique(np.asarray(mask)).tolist())
            assert values == {0, 255}


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a = _write(tmp_path, "a", 3, 5, 2)
    b = _write(tmp_path, "b", 3, 5, 2)
    c = _write(tmp_path, "c", 3, 6, 2)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    assert (a / "00000.png").read_bytes() != (c / "00000.png").read_bytes()


def test_objects_are_sized_disjoint_distinct_and_visible() -> None:
    for i in range(40):
        n_objects = 1 + i % 2
        image, objects = make_scene(scene_rng(TEST_SEED, i), n_objects)
        pixels = np.asarray(image, dtype=np.float32)  # (SIZE, SIZE, 3)
        assert len(objects) == n_objects
        for class_id, mask in objects:
            assert 0 <= class_id < len(CLASS_NAMES)
            assert mask.shape == (SIZE, SIZE) and mask.dtype == np.bool_
            ys, xs = np.nonzero(mask)
            assert 25 <= max(np.ptp(ys), np.ptp(xs)) <= 115  # roughly 40-110 px across
            # The object is a clearly different colour from the ring of background just around it.
            grown = np.zeros_like(mask)
            grown[max(ys.min() - 6, 0) : ys.max() + 7, max(xs.min() - 6, 0) : xs.max() + 7] = True
            inside = np.median(pixels[mask], axis=0)
            outside = np.median(pixels[grown & ~mask], axis=0)
            assert np.linalg.norm(inside - outside) > 30
        if n_objects == 2:
            (c0, m0), (c1, m1) = objects
            assert c0 != c1
            assert not (m0 & m1).any()


def test_all_classes_occur() -> None:
    seen = {objects[0][0] for objects in (make_scene(scene_rng(TEST_SEED, i), 1)[1] for i in range(80))}
    assert seen == set(range(len(CLASS_NAMES)))


def test_shipped_model_loads_and_classifies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import timm
    import torch

    assert (MODEL_DIR / "config.json").is_file() and (MODEL_DIR / "model.safetensors").is_file()
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) <= 10 * 1024 * 1024
    model = timm.create_model(f"local-dir:{os.fspath(MODEL_DIR.resolve())}", pretrained=True).eval()
    cfg = model.pretrained_cfg
    assert list(cfg["label_names"]) == CLASS_NAMES
    assert tuple(cfg["input_size"]) == (3, SIZE, SIZE)
    assert model.patch_embed.grid_size == (14, 14)
    assert model.blocks[0].attn.num_heads == 3
    assert model.cls_token is not None and model.global_pool == "token"
    assert model.num_classes == len(CLASS_NAMES)

    batch = [make_scene(scene_rng(TEST_SEED, i), 1) for i in range(32)]
    x = torch.from_numpy(np.stack([np.asarray(img) for img, _ in batch])).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        predicted = model((x - mean) / std).argmax(1)  # (32,)
    truth = torch.tensor([objects[0][0] for _, objects in batch])
    # The shipped model measures 0.81 on 1000 held-out scenes (model card); a broken model,
    # export or preprocessing lands near chance (0.125).
    assert (predicted == truth).float().mean().item() >= 0.6
