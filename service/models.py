"""Model specs, loading through timm, class labels and preprocessing, from the model's own config."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo
from torch import nn

_SOURCES = ("hf-hub:", "local-dir:")

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class ModelSpec:
    """`[ALIAS=]SPEC` from the command line: SPEC is what timm.create_model(..., pretrained=True) takes."""

    alias: str
    spec: str

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        alias, sep, spec = text.partition("=")
        if not sep:
            alias, spec = "", text
        spec, alias = spec.strip(), alias.strip()
        if not spec:
            raise ValueError(f"empty model spec in {text!r}")
        if not alias:
            bare = spec
            for prefix in _SOURCES:
                bare = bare.removeprefix(prefix)
            alias = bare.rstrip("/").split("/")[-1]
        return cls(alias=alias, spec=spec)


@dataclass(frozen=True)
class Preprocess:
    """Whole image -> (3, H, W) float32: squash-resize to the input size (no crop), scale, normalise."""

    size: tuple[int, int]  # (H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    @classmethod
    def from_model(cls, model: nn.Module) -> "Preprocess":
        cfg = timm.data.resolve_model_data_config(model)
        _, h, w = cfg["input_size"]
        return cls(size=(h, w), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), interpolation=cfg["interpolation"])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        h, w = self.size
        resample = _INTERPOLATIONS.get(self.interpolation, Image.Resampling.BICUBIC)
        arr = np.asarray(img.convert("RGB").resize((w, h), resample=resample), dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())  # (3, H, W)


def class_labels(model: nn.Module) -> list[str]:
    """Human-readable names: the config's label descriptions or names, else ImageNet-1k, else `class N`."""
    n = int(model.num_classes)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = _as_list(cfg.get("label_names"), n)
    descriptions = cfg.get("label_descriptions")
    if isinstance(descriptions, dict) and names:
        return [str(descriptions.get(nm, nm)) for nm in names]
    described = _as_list(descriptions, n)
    if described:
        return described
    if names:
        return names
    if n == 1000:
        return list(ImageNetInfo("imagenet-1k").label_descriptions())
    return [f"class {i}" for i in range(n)]


def _as_list(labels, n: int) -> list[str] | None:
    if isinstance(labels, dict):
        labels = [labels.get(i, labels.get(str(i), f"class {i}")) for i in range(n)]
    if isinstance(labels, (list, tuple)) and len(labels) == n:
        return [str(x) for x in labels]
    return None


def create(spec: ModelSpec) -> nn.Module:
    """The timm model with its pretrained weights (hub, hub cache or local folder), in eval mode."""
    return timm.create_model(spec.spec, pretrained=True).eval()
