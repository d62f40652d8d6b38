"""Train the offline demo model: a small timm ViT that names the shape in a synthetic scene.

    HF_HUB_OFFLINE=1 .venv/bin/python -m demo.train      # what `make train-demo` runs

The model is a narrow ViT (patch 16 on 224x224, 14x14 grid, 3 heads, class token,
token pooling) trained from scratch on scenes from :mod:`demo.scenes`:
60% single-object scenes (one-hot target) and 40% two-object scenes (target 0.5 on
each present class), so each present class's logit depends on its own object's
patches, which class-specific explanations rely on.

A from-scratch ViT trained on the class target alone sat at chance (loss ln 8) for
over a thousand steps. Training therefore adds a dense auxiliary loss: a linear head
on the final patch tokens predicts, per patch, the class of the object covering at
least 25% of it, or "background" (labels from the generator's exact masks). The
auxiliary head is dropped; the saved model is a plain timm VisionTransformer.

To fit a CPU budget the bulk of training runs at 112x112 (7x7 patches, ~4x cheaper);
the position embedding is then resampled to 14x14 and training finishes at 224x224
with exactly the service's preprocessing (resize to 224, mean = std = 0.5).
``--backbone hybrid`` swaps the linear patch projection for timm's hybrid ViT (a ResNet stem,
then 4x4 patches of its features, still 14x14 tokens at 224): it learns more per step but
costs 2.8x per step at 112 px and loses more at the switch to 224 px, so on a 2-core CPU
it ends below the default (see the model card). It is kept for machines with more compute.
The result is saved with ``timm.models.save_for_hf`` to service/demo/shapes-vit and
loads with ``timm.create_model("local-dir:<path>", pretrained=True)``.
"""

from __future__ import annotations

import argparse
import math
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from demo.scenes import CLASS_NAMES, SIZE, make_scene, scene_rng
from service.config import SHAPES_VIT

MODEL_DIR = SHAPES_VIT  # the default --out: the bundled weights the service loads, service/demo/shapes-vit
MEAN = STD = (0.5, 0.5, 0.5)
TRAIN_SEED = 1  # scenes for training: scene_rng(TRAIN_SEED, i)
EVAL_SEED = 20250  # held-out scenes, never used for training
TWO_OBJECT_SHARE = 0.4
BATCH = 64
PATCH = 16
BACKGROUND = len(CLASS_NAMES)  # patch label for 'no object'

ARCH = dict(embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0)
"""Transformer overrides on the timm architectures below (which have embed_dim 192, depth 12)."""

BACKBONES = {
    # 16x16 pixel patches, linear projection
    "vit": ("vit_tiny_patch16_224", dict(patch_size=16)),
    # ResNet stem (7x7 conv stride 2, max-pool stride 2) then 4x4 patches of its features: 16 px per token
    "hybrid": ("vit_tiny_r_s16_p8_224", dict(patch_size=4)),
}


# --------------------------------------------------------------------------- data


def _patch_labels(objects: list, patch: int) -> np.ndarray:
    """Per-patch class (SIZE/patch, SIZE/patch) uint8: the object covering >= 25% of the patch, else BACKGROUND."""
    g = SIZE // patch
    labels = np.full((g, g), BACKGROUND, np.uint8)
    best = np.full((g, g), 0.25, np.float32)
    for class_id, mask in objects:
        cover = mask.reshape(g, patch, g, patch).mean(axis=(1, 3), dtype=np.float32)  # (g, g)
        hit = cover >= best
        labels[hit], best[hit] = class_id, cover[hit]
    return labels


def _render(index: int) -> tuple[np.ndarray, ...]:
    """Training scene `index`: image (SIZE, SIZE, 3) uint8, its half-size copy, soft target (C,) float32 and
    per-patch labels at full size (14, 14) and half size (7, 7)."""
    n_objects = 2 if (index % 10) < 10 * TWO_OBJECT_SHARE else 1
    image, objects = make_scene(scene_rng(TRAIN_SEED, index), n_objects)
    target = np.zeros(len(CLASS_NAMES), np.float32)
    for class_id, _mask in objects:
        target[class_id] = 1.0 / len(objects)
    half = image.resize((SIZE // 2, SIZE // 2), Image.BILINEAR)  # antialiased downscale
    return np.asarray(image), np.asarray(half), target, _patch_labels(objects, PATCH), _patch_labels(objects, 2 * PATCH)


def build_pool(n: int, workers: int = 2) -> dict[str, torch.Tensor]:
    """Render n training scenes in parallel.

    Returns {"full": (n, SIZE, SIZE, 3) uint8, "half": (n, SIZE/2, SIZE/2, 3) uint8, "target": (n, C) float32,
    "patch_full": (n, 14, 14) int64, "patch_half": (n, 7, 7) int64}.
    """
    g = SIZE // PATCH
    pool = {
        "full": torch.empty((n, SIZE, SIZE, 3), dtype=torch.uint8),
        "half": torch.empty((n, SIZE // 2, SIZE // 2, 3), dtype=torch.uint8),
        "target": torch.empty((n, len(CLASS_NAMES)), dtype=torch.float32),
        "patch_full": torch.empty((n, g, g), dtype=torch.int64),
        "patch_half": torch.empty((n, g // 2, g // 2), dtype=torch.int64),
    }
    keys = list(pool)
    with Pool(workers) as workers_pool:
        for i, arrays in enumerate(workers_pool.imap(_render, range(n), chunksize=64)):
            for key, array in zip(keys, arrays):
                pool[key][i] = torch.from_numpy(array)
    return pool


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float (B, 3, H, W) with MEAN and STD, as the service does.

    Scenes are already SIZE x SIZE, so the service's resize to the model input is the identity.
    """
    x = images.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W) in [0, 1]
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def augment(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-preserving augmentation of uint8 images (B, H, W, 3) and their patch labels (B, g, g):
    a random rot90/flip per batch (applied to both), a channel shuffle per image."""
    k = int(torch.randint(0, 4, (1,), generator=gen))
    images, labels = torch.rot90(images, k, dims=(1, 2)), torch.rot90(labels, k, dims=(1, 2))
    if torch.rand(1, generator=gen) < 0.5:
        images, labels = images.flip(2), labels.flip(2)
    perm = torch.argsort(torch.rand(images.shape[0], 3, generator=gen), dim=1)  # (B, 3)
    return torch.gather(images, 3, perm[:, None, None, :].expand_as(images)), labels


# --------------------------------------------------------------------------- model


def create_model(backbone: str = "vit") -> torch.nn.Module:
    """A freshly initialised demo ViT whose pretrained_cfg records the preprocessing it is trained with."""
    name, embed = BACKBONES[backbone]
    return timm.create_model(
        name,
        pretrained=False,
        img_size=SIZE,
        **embed,
        class_token=True,
        global_pool="token",
        num_classes=len(CLASS_NAMES),
        pretrained_cfg_overlay=dict(
            mean=MEAN,
            std=STD,
            input_size=(3, SIZE, SIZE),
            interpolation="bilinear",
            crop_pct=1.0,
            crop_mode="center",
            tag="shapes_demo",
            num_classes=len(CLASS_NAMES),
            label_names=CLASS_NAMES,
        ),
        **ARCH,
    )


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine decay to 1% of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_phase(
    model: torch.nn.Module,
    aux_head: torch.nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    patch_labels: torch.Tensor,
    *,
    steps: int,
    batch: int,
    peak_lr: float,
    warmup: int,
    aux_weight: float,
    gen: torch.Generator,
) -> None:
    """Train `steps` AdamW steps on uint8 images (N, size, size, 3).

    Loss: soft-target cross entropy on the class logits plus `aux_weight` times a per-patch cross entropy
    (object class or background, from the final patch tokens through `aux_head`). The dense patch loss
    is what gets a from-scratch ViT off chance quickly; the auxiliary head is not part of the saved model.
    """
    size = images.shape[1]
    model.set_input_size(img_size=(size, size))  # resamples the position embedding to the new grid
    params = list(model.parameters()) + list(aux_head.parameters())
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], betas=(0.9, 0.999)
    )
    model.train()
    aux_head.train()
    start, seen, correct, loss_sum, aux_sum = time.time(), 0, 0, 0.0, 0.0
    for step in range(steps):
        lr = _lr_at(step, steps, peak_lr, warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        x, labels = augment(images[idx], patch_labels[idx], gen)
        x = preprocess(x)  # (B, 3, size, size)
        y = targets[idx]  # (B, C) soft targets
        tokens = model.forward_features(x)  # (B, 1 + g*g, D)
        logits = model.forward_head(tokens)  # (B, C)
        loss = torch.sum(-y * F.log_softmax(logits, dim=1), dim=1).mean()
        aux = F.cross_entropy(aux_head(tokens[:, model.num_prefix_tokens :]).flatten(0, 1), labels.flatten())
        opt.zero_grad(set_to_none=True)
        (loss + aux_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        single = y.max(dim=1).values == 1.0
        correct += int((logits.argmax(1) == y.argmax(1))[single].sum())
        seen += int(single.sum())
        loss_sum += loss.item()
        aux_sum += aux.item()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            n = (step % 50) + 1
            print(
                f"  {size}px step {step + 1}/{steps}  lr {lr:.1e}  loss {loss_sum / n:.3f}  "
                f"patch loss {aux_sum / n:.3f}  "
                f"train acc (1-object) {correct / max(seen, 1):.3f}  {time.time() - start:.0f}s",
                flush=True,
            )
            seen, correct, loss_sum, aux_sum = 0, 0, 0.0, 0.0


@torch.no_grad()
def evaluate(model: torch.nn.Module, n: int = 1000, seed: int = EVAL_SEED) -> float:
    """Top-1 accuracy on n fresh single-object scenes from `seed`, at SIZE with service preprocessing."""
    model.eval()
    correct = 0
    for lo in range(0, n, 100):
        scenes = [make_scene(scene_rng(seed, i), 1) for i in range(lo, min(n, lo + 100))]
        x = preprocess(torch.from_numpy(np.stack([np.asarray(img) for img, _ in scenes])))
        y = torch.tensor([objects[0][0] for _, objects in scenes])
        correct += int((model(x).argmax(1) == y).sum())
    return correct / n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the demo shapes ViT.")
    parser.add_argument("--pool", type=int, default=12000, help="training scenes rendered once and reused")
    parser.add_argument("--steps-low", type=int, default=9000, help="steps at 112x112")
    parser.add_argument("--steps-high", type=int, default=400, help="steps at 224x224")
    parser.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate at 112x112 (a third at 224)")
    parser.add_argument("--aux-weight", type=float, default=1.0, help="weight of the per-patch auxiliary loss")
    parser.add_argument("--pool-cache", type=Path, default=None,
                        help="load the rendered pool from / save it to this file")
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="vit", help="patch embedding")
    parser.add_argument("--batch-high", type=int, default=BATCH, help="batch size at 224x224")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (use 1 on a busy shared 2-core box)")
    parser.add_argument("--eval-n", type=int, default=1000, help="held-out scenes for the final accuracy")
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()

    if args.pool_cache is not None and args.pool_cache.is_file():
        pool = torch.load(args.pool_cache)
        assert pool["target"].shape[0] == args.pool, "pool cache was rendered with another --pool"
    else:
        pool = build_pool(args.pool)
        if args.pool_cache is not None:
            torch.save(pool, args.pool_cache)
    print(f"{args.pool} training scenes ready in {time.time() - t0:.0f}s", flush=True)

    model = create_model(args.backbone)
    aux_head = torch.nn.Linear(model.embed_dim, len(CLASS_NAMES) + 1)  # object class per patch, or background
    common = dict(aux_weight=args.aux_weight, gen=gen)
    train_phase(
        model, aux_head, pool["half"], pool["target"], pool["patch_half"],
        steps=args.steps_low, batch=BATCH, peak_lr=args.lr, warmup=100, **common,
    )
    train_phase(
        model, aux_head, pool["full"], pool["target"], pool["patch_full"],
        steps=args.steps_high, batch=args.batch_high, peak_lr=args.lr / 3, warmup=10, **common,
    )
    train_time = time.time() - t0
    print(f"trained in {train_time / 60:.1f} min", flush=True)

    model.eval()
    timm.models.save_for_hf(
        model,
        str(args.out),
        model_config={"label_names": CLASS_NAMES},
        safe_serialization=True,
    )
    print(f"saved to {args.out}", flush=True)
    accuracy = evaluate(model, n=args.eval_n)
    print(f"held-out single-object accuracy: {accuracy:.4f} ({args.eval_n} scenes, seed {EVAL_SEED})", flush=True)


if __name__ == "__main__":
    main()
