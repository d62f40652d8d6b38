"""The `transformers:` model source: a Hugging Face `transformers` image classifier, from a folder
that `save_pretrained` wrote (the model and its image processor's preprocessor_config.json) or a
hub repository, as one more model the service explains.

    --model ALIAS=transformers:/path/to/folder       or   transformers:google/vit-base-patch16-224

What is read, and what is refused (each a `Refused` whose message is the model's `unavailable` reason):
- config.json, as JSON: its `architectures` must name one class of `FAMILIES`; the model is built from
  that class of the installed `transformers`, never from code in the folder. A config (or processor
  config) with an `auto_map` needs remote code and is refused: `trust_remote_code` is never on.
- the weights: safetensors only (model.safetensors, or shards with model.safetensors.index.json);
  pickled `pytorch_model.bin` is never loaded.
- preprocessor_config.json, as JSON: the input size (the crop size where the processor crops, else its
  resize size), the rescale factor, mean and std. The whole image is squash-resized to the input size,
  as for timm models: the map covers the whole upload.
- labels from config.id2label.

`transformers` is an optional extra (`pip install '.[transformers]'`); without it such a model is
refused with that command and the service serves the others. The model runs its attention through
`transformers.AttentionInterface` under the adapter's name (service/engine/adapters/transformers_models.py),
which computes the attention written out where a capture asks for it and SDPA otherwise.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from torch import nn

INSTALL = "pip install '.[transformers]' (make install does)"

# The allow-list: config.json's architecture -> its family. What each head reads (the explained row) is the
# adapter's to say (service/engine/adapters/transformers_models.py).
FAMILIES = {
    "ViTForImageClassification": "vit",
    "DeiTForImageClassification": "deit",
    "DeiTForImageClassificationWithTeacher": "deit",  # its logit: the mean of its two heads
    "BeitForImageClassification": "beit",
    "Dinov2ForImageClassification": "dinov2",  # reads the class token and the mean of the patches
    "Dinov2WithRegistersForImageClassification": "dinov2",
}
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
# what a hub snapshot fetches: never a pickle, never code
HUB_FILES = ["config.json", "preprocessor_config.json", "*.safetensors", "model.safetensors.index.json"]

# PIL's resampling codes, as image processors save them
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class Refused(ValueError):
    """This checkpoint cannot be served; the message says why (and what to do)."""


class HFClassifier(nn.Module):
    """A transformers image classifier as the engine calls a model: pixels (B, 3, H, W) -> logits (B, C).

    For a DeiT with teacher the logit is the model's own, the mean of its class and distillation heads."""

    def __init__(self, hf: nn.Module, input_config: dict, labels: list[str], source: str) -> None:
        super().__init__()
        self.hf = hf
        self.input_config = input_config  # size, mean, std, interpolation: the anatomy reads them
        self.labels = labels
        self.source = source
        self.num_classes = len(labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=x).logits


def transformers_module():
    """The installed `transformers`, or Refused naming the install command."""
    try:
        return importlib.import_module("transformers")
    except ImportError as e:
        raise Refused(f"the transformers package is not installed ({e}): {INSTALL}") from None


def load(ref: str) -> HFClassifier:
    """`transformers:` SPEC without its prefix (a folder or a hub id) -> the model in eval mode, or Refused."""
    from service.engine import adapters
    from service.engine.adapters import transformers_models as adapter

    transformers = transformers_module()
    folder = _folder(ref)
    config = _json(folder / "config.json", "config.json (the model's config, written by save_pretrained)")
    processor = _json(folder / "preprocessor_config.json",
                      "preprocessor_config.json (save the image processor beside the model)")
    for name, cfg in (("config.json", config), ("preprocessor_config.json", processor)):
        if "auto_map" in cfg:
            raise Refused(f"{name} names custom code (auto_map: {cfg['auto_map']}); the service never runs code "
                          "from a model repository (trust_remote_code stays off)")
    arch = _architecture(config)
    if not any((folder / w).is_file() for w in WEIGHTS):
        bins = sorted(p.name for p in folder.glob("*.bin"))
        raise Refused(f"no safetensors weights (model.safetensors) in {folder}"
                      + (f"; pickled weights ({', '.join(bins)}) are never loaded" if bins else ""))
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise Refused(f"the installed transformers {transformers.__version__} has no {arch}")
    adapter.register()
    hf = cls.from_pretrained(str(folder), use_safetensors=True, trust_remote_code=False, local_files_only=True,
                             attn_implementation=adapter.ATTN_IMPLEMENTATION).eval()
    pre = preprocess(processor)
    n = int(hf.config.num_labels)
    id2label = {int(k): str(v) for k, v in (hf.config.id2label or {}).items()}
    labels = [id2label.get(i, f"class {i}") for i in range(n)]
    model = HFClassifier(hf, pre, labels, ref).eval()
    _check_capture(model, adapters.describe(model))  # UnsupportedModel where the parts are not all there
    return model


def _check_capture(model: HFClassifier, anatomy) -> None:
    """One forward of a blank image with every block's attention captured: each block's attention must go
    through the adapter's function (a transformers release whose module computed it some other way would
    otherwise answer requests without maps).

    Under no_grad, not inference_mode: BEiT caches its relative position index per window size for the
    whole process (an lru_cache), and an index first made under inference_mode can never be used where the
    weights require grad (the engine's never do; the float64 reference in the tests, in the same process, does).
    This forward is the model's first: it makes the cached one."""
    from service.engine import capture

    installed = capture.install(anatomy)
    try:
        with torch.no_grad(), capture.capture(attn_layers=frozenset(range(anatomy.layers))) as store:
            model(torch.zeros(1, 3, *anatomy.input_size))
    finally:
        installed.remove()
    missing = [b for b in range(anatomy.layers) if b not in store.attn]
    if missing:
        transformers = transformers_module()
        raise Refused(f"the attention of blocks {missing} of {type(model.hf).__name__} does not go through "
                      f"transformers' AttentionInterface in transformers {transformers.__version__}: it cannot be "
                      "captured")


def _folder(ref: str) -> Path:
    """A local folder as it is, or a hub repository's config, processor config and safetensors
    (from the hub, or only the local cache when it is offline) in the local cache."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if ref.startswith((".", "/", "~")) or path.exists():
        raise Refused(f"no such folder: {ref}")
    import huggingface_hub

    return Path(huggingface_hub.snapshot_download(ref, allow_patterns=HUB_FILES))


def _json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise Refused(f"no {what} in {path.parent}")
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise Refused(f"{path.name} is not readable JSON: {e}") from None
    if not isinstance(out, dict):
        raise Refused(f"{path.name} is not a JSON object")
    return out


def _architecture(config: dict) -> str:
    archs = config.get("architectures") or []
    known = ", ".join(FAMILIES)
    if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
        raise Refused(f"config.json must name one model class in `architectures` (got {archs!r}); "
                      f"the service builds one of: {known}")
    if archs[0] not in FAMILIES:
        raise Refused(f"no attention adapter for {archs[0]}: the service explains these transformers classes: "
                      f"{known}")
    return archs[0]


def preprocess(processor: dict) -> dict:
    """An image processor's config -> the service's preprocessing (service.models.Preprocess's fields): the
    input size (the crop where it
    crops, else the resize), resampling, and mean and std folded with the rescale factor so that
    the engine's x / 255 then (x - mean) / std equals the processor's (x * rescale - mean) / std."""
    size = _size(processor.get("crop_size") if processor.get("do_center_crop") else processor.get("size"))
    if size is None:
        raise Refused(f"preprocessor_config.json gives no usable input size (size {processor.get('size')!r}, "
                      f"crop_size {processor.get('crop_size')!r})")
    rescale = float(processor.get("rescale_factor", 1 / 255)) if processor.get("do_rescale", True) else 1.0
    if processor.get("do_normalize", True):
        mean = _triple(processor.get("image_mean", (0.5, 0.5, 0.5)), "image_mean")
        std = _triple(processor.get("image_std", (0.5, 0.5, 0.5)), "image_std")
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if rescale <= 0 or any(s <= 0 for s in std):
        raise Refused(f"preprocessor_config.json: rescale_factor {rescale} and image_std {std} must be positive")
    k = 255.0 * rescale  # pixels / 255 * k = pixels * rescale
    return dict(size=size, mean=tuple(m / k for m in mean), std=tuple(s / k for s in std),
                interpolation=_RESAMPLE.get(processor.get("resample", 2), "bilinear"))


def _size(size) -> tuple[int, int] | None:
    """{"height", "width"}, {"shortest_edge"} (square), or an int -> (H, W)."""
    if isinstance(size, int):
        return (size, size)
    if not isinstance(size, dict):
        return None
    if "height" in size and "width" in size:
        return (int(size["height"]), int(size["width"]))
    if "shortest_edge" in size:
        return (int(size["shortest_edge"]),) * 2
    return None


def _triple(v, name: str) -> tuple[float, float, float]:
    if isinstance(v, (int, float)):
        v = [v] * 3
    if not isinstance(v, (list, tuple)) or len(v) != 3:
        raise Refused(f"preprocessor_config.json: {name} must be 3 numbers, not {v!r}")
    return tuple(float(x) for x in v)
