"""Model specs, loading through timm, class labels and preprocessing, from the model's own config."""

from __future__ import annotations

import logging
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import numpy as np
import timm
from PIL import Image
from torch import nn

from service import imaging

log = logging.getLogger(__name__)

# timm: a bare name, hf-hub:REPO or local-dir:PATH; transformers:PATH_OR_REPO (service/hf_models.py)
_SOURCES = ("hf-hub:", "local-dir:", "transformers:")
_PREFIX = re.compile(r"^([A-Za-z][\w.+-]+):")  # 2+ characters, as timm's: C:\ is a drive, not a source

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
    """`[ALIAS=]SPEC` from the command line: SPEC is what timm.create_model(..., pretrained=True) takes,
    or `transformers:` and a folder written by save_pretrained or a hub id (service/hf_models.py)."""

    alias: str
    spec: str

    @property
    def source(self) -> str:
        """Which library builds the model: `timm` or `transformers`."""
        return "transformers" if self.spec.startswith("transformers:") else "timm"

    @property
    def uses_hub(self) -> bool:
        """Weights come from the Hugging Face hub (or its local cache), not from a local folder."""
        if self.source == "transformers":
            ref = self.spec.removeprefix("transformers:")
            return not (ref.startswith((".", "/", "~")) or Path(ref).expanduser().exists())
        return not self.spec.startswith("local-dir:")

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        alias, sep, spec = text.partition("=")
        if not sep:
            alias, spec = "", text
        spec, alias = spec.strip(), alias.strip()
        if not spec:
            raise ValueError(f"empty model spec in {text!r}")
        source = _PREFIX.match(spec)
        if source and f"{source.group(1).lower().replace('hf_hub', 'hf-hub')}:" not in _SOURCES:
            raise ValueError(f"unknown model source {source.group(1)!r} in {text!r}: give a timm model name or "
                             f"one of the sources {', '.join(_SOURCES)}")
        if not alias:
            bare = spec
            for prefix in _SOURCES:
                bare = bare.removeprefix(prefix)
            alias = bare.rstrip("/").split("/")[-1]
        return cls(alias=alias, spec=spec)


@dataclass(frozen=True)
class Preprocess:
    """The model's input from its own config: squash-resize to the input size (no crop), then
    scale and normalise. The resize runs where the upload is decoded (service/imaging.py: uint8
    at the input size); the scaling and normalisation run batched on the model's device
    (ModelShape.normalize, service/engine/engine.py)."""

    size: tuple[int, int]  # (H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    @classmethod
    def from_model(cls, model: nn.Module) -> Preprocess:
        cfg = timm.data.resolve_model_data_config(model)
        _, h, w = cfg["input_size"]
        return cls(size=(h, w), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), interpolation=cfg["interpolation"])

    @classmethod
    def from_anatomy(cls, anatomy) -> Preprocess:
        """From what the engine read of the model (service/engine/adapters.Anatomy), whatever its source."""
        return cls(size=anatomy.input_size, mean=anatomy.mean, std=anatomy.std, interpolation=anatomy.interpolation)

    @property
    def resample(self) -> Image.Resampling:
        return _INTERPOLATIONS.get(self.interpolation, Image.Resampling.BICUBIC)

    def target(self, canvas: int | None = None, keep_jpeg: bool = False) -> imaging.Target:
        """What decoding must produce for this model (and an answer drawn at `canvas`)."""
        return imaging.Target(input_size=self.size, resample=self.resample, canvas=canvas, keep_jpeg=keep_jpeg)

    def __call__(self, img: Image.Image) -> np.ndarray:
        """Whole RGB image -> (H, W, 3) uint8 at the input size."""
        return imaging.to_input(img if img.mode == "RGB" else img.convert("RGB"), self.size, self.resample)


def create(spec: ModelSpec) -> nn.Module:
    """The model with its pretrained weights (hub, hub cache or local folder), in eval mode: timm's, or
    a transformers classifier (service/hf_models.py)."""
    if spec.source == "transformers":
        from service import hf_models

        return hf_models.load(spec.spec.removeprefix("transformers:"))
    return timm.create_model(spec.spec, pretrained=True).eval()


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Can we open a TCP connection to the hub? (A quick probe: DNS and connect, no request.)"""
    host = urlparse(huggingface_hub.constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def offline_unless_hub_reachable(specs: list[ModelSpec]) -> None:
    """Where the hub cannot be reached, use only cached weights instead of retrying for a minute.

    huggingface_hub retries unreachable downloads with back-off (about 50 s per model here);
    a model whose weights are neither reachable nor cached should be reported unavailable at
    once, so that the service is ready with the models it does have.
    """
    if huggingface_hub.constants.HF_HUB_OFFLINE or not any(s.uses_hub for s in specs):
        return
    if not hub_reachable():
        huggingface_hub.constants.HF_HUB_OFFLINE = True
        log.warning("the Hugging Face hub is unreachable: hub models load from the local cache only")
