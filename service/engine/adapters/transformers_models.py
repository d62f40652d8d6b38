"""transformers: the attention adapter of the `transformers` self-attention modules (ViT, DeiT, BEiT, DINOv2,
DINOv2 with registers) and the anatomy of the classifiers service/hf_models.py loads.

These modules compute q, k, v and hand them to the function `transformers.AttentionInterface` holds under
the config's `_attn_implementation`:

    attn_output (B, N, H, Dv), weights = f(module, q, k, v (B, H, N, D), mask, scaling=..., dropout=...)

`mask` carries what is added to the scaled scores: BEiT's relative position bias (1, H, N, N), else None.
Rather than cut the module's forward in two (split/merge), the service loads these models with
attn_implementation=ATTN_IMPLEMENTATION, `attention` below: the module's own forward runs as shipped, and
only the attention product is ours. A captured block goes to `capture.attend`, which computes
a = softmax(q k^T * scale + bias) in the model's dtype, keeps or hands on `a` and returns a @ v; any other
call runs transformers' own SDPA function, as the model would. The adapter's `bind` tells each module its
block index, once, when the model is installed. transformers is imported inside functions only: it is an
optional extra.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from service.engine import capture
from service.engine.adapters.base import (
    Adapter,
    Anatomy,
    UnsupportedModel,
    attention_of,
    register_adapter,
    register_source,
)

ATTN_IMPLEMENTATION = "vit_explain"
_BLOCK = "_vit_explain_block"  # the attention module's block index, set by `bind`

# the transformers attention classes this adapter serves: (module under transformers.models, class)
CLASSES = [("vit", "ViTAttention"), ("deit", "DeiTAttention"), ("beit", "BeitAttention"),
           ("dinov2", "Dinov2Attention"), ("dinov2_with_registers", "Dinov2WithRegistersAttention")]


def register() -> None:
    """Put `attention` into transformers' AttentionInterface and the adapters into the table (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, attention)
    for module, name in CLASSES:
        kind = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)
        register_adapter(Adapter(f"transformers.{name}", kind, bind=_bind, refuse=_uses_ours))


def _bind(module: nn.Module, block: int) -> None:
    setattr(module, _BLOCK, block)


def _uses_ours(module: nn.Module) -> str | None:
    impl = module.config._attn_implementation
    return None if impl == ATTN_IMPLEMENTATION else \
        f"loaded with attn_implementation={impl!r}, not {ATTN_IMPLEMENTATION!r} (service/hf_models.py loads it so)"


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
              **kwargs) -> tuple[torch.Tensor, None]:
    """q, k, v (B, H, N, D); mask None or added to the scores (1|B, H, N, N) -> ((B, N, H, Dv), None)."""
    o = capture.attend(getattr(module, _BLOCK, None), query, key, value, attention_mask, scaling)
    if o is None:  # nothing captured here
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if dropout:
        raise UnsupportedModel("attention dropout is on (a model in training mode?): cannot be captured")
    return o.transpose(1, 2), None  # (B, H, N, Dv) -> (B, N, H, Dv), as the module reshapes it


# -- the anatomy of a transformers classifier (service/hf_models.HFClassifier) ----------------------------
def describe(model: nn.Module) -> Anatomy | None:
    """model.hf, a transformers classifier, and model.input_config / model.labels from its folder."""
    hf = getattr(model, "hf", None)
    if hf is None or not type(hf).__module__.startswith("transformers."):
        return None
    register()
    arch, cfg, base = type(hf).__name__, hf.config, hf.base_model
    # the encoder's layers (ViT, DeiT: base.layers; BEiT: base.encoder.layers; DINOv2: base.encoder.layer)
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) == cfg.num_hidden_layers]
    if not lists:
        raise UnsupportedModel(f"{arch}: no list of its {cfg.num_hidden_layers} encoder layers")
    blocks = list(lists[0])
    attns = []
    for i, blk in enumerate(blocks):
        found = [m for m in blk.modules() if hasattr(m, "q_proj") and hasattr(m, "num_attention_heads")]
        if len(found) != 1:
            raise UnsupportedModel(f"{arch} block {i}: {len(found)} self-attention modules, not one")
        attention_of(found[0])  # raises naming the class when no adapter knows it
        attns.append(found[0])
    emb = base.embeddings
    registers = getattr(emb, "register_tokens", None)
    prefix = 1 + int(getattr(emb, "distillation_token", None) is not None)  # class (+ distillation) token
    prefix += int(registers.shape[1]) if registers is not None else 0
    patch = cfg.patch_size if isinstance(cfg.patch_size, (list, tuple)) else (cfg.patch_size,) * 2
    h, w = model.input_config["size"]
    if h % patch[0] or w % patch[1]:
        raise UnsupportedModel(f"the input size {h}x{w} is not a whole number of {patch[0]}x{patch[1]} patches")
    # BEiT's head pools the mean of the patch tokens (use_mean_pooling); the others read the class token
    # (DINOv2's beside the mean of the patches: still explained by the class token's row)
    pooling = "avg" if getattr(cfg, "use_mean_pooling", False) else "token"
    return Anatomy(
        source="transformers", family=arch, blocks=blocks, attentions=attns, pool=None,
        grid=(h // patch[0], w // patch[1]), prefix=prefix, pooling=pooling, input_size=(h, w),
        mean=tuple(model.input_config["mean"]), std=tuple(model.input_config["std"]), labels=tuple(model.labels),
        heads=int(attns[0].num_attention_heads), head_dim=int(attns[0].head_dim), embed_dim=int(cfg.hidden_size),
        forward=model, interpolation=model.input_config["interpolation"],
    )


register_source("transformers", describe)
