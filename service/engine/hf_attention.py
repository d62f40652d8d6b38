"""The capture adapter of `transformers` self-attention (ViT, DeiT, BEiT, DINOv2, DINOv2 with registers).

Each of these modules computes q, k, v and hands them to the function that
`transformers.AttentionInterface` holds under the config's `_attn_implementation`:

    attn_output (B, N, H, Dv), weights = f(module, q, k, v (B, H, N, D), mask, scaling=..., dropout=...)

where `mask` carries what is added to the scores: BEiT's relative position bias (1, H, N, N), nothing
for the others. The service loads these models with `attn_implementation=ATTN_IMPLEMENTATION`, this
module's `attention`: outside a capture, or for a block whose attention is not wanted, it runs
transformers' own SDPA function, as the model ships; for a block whose attention is wanted it computes
a = softmax(q k^T * scaling + mask) in the model's dtype, hands `a` to the capture (kept whole, or
taken a chunk of images at a time) and returns a @ v: the model multiplies v by exactly the tensor
captured. q and k are recorded as they enter the product. Which block a module is comes from an
attribute set once when the model is loaded (`install`), so nothing here knows a family by name.
"""

from __future__ import annotations

import torch
from torch import nn

from service.engine import capture

ATTN_IMPLEMENTATION = "vit_explain"
_BLOCK = "_vit_explain_block"  # the attention module's block index, set by `install`


def register() -> None:
    """Put `attention` into transformers' AttentionInterface (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, attention)


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
              **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k, v (B, H, N, D); mask None or added to the scores (.., H|1, N, N) -> ((B, N, H, Dv), None)."""
    store = capture._ACTIVE.get()
    block = getattr(module, _BLOCK, None)
    if store is not None and block in store.qk_layers:
        store.q[block], store.k[block] = query, key
    if store is None or block not in store.attn_layers:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if dropout:
        raise capture.UnsupportedModel("attention dropout is on (a model in training mode?): cannot be captured")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    b, h, n, _ = query.shape
    if store.take is None:
        attn = _softmax(query, key, scale, attention_mask)  # (B, H, N, N)
        store.attn[block] = attn
        return (attn @ value).transpose(1, 2), None
    out = value.new_empty(b, n, h, value.shape[-1])  # (B, N, H, Dv): what the module reshapes to (B, N, H*Dv)
    step = capture.CPU_CHUNK if query.device.type == "cpu" else b
    for start in range(0, b, step):
        rows = slice(start, min(start + step, b))
        attn = _softmax(query[rows], key[rows], scale, capture._rows_of(attention_mask, rows))
        out[rows] = (attn @ value[rows]).transpose(1, 2)
        store.take(block, rows, attn)
    return out, None


def _softmax(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T * scale [+ bias]) in q's dtype: (b, H, N, D) x2 -> (b, H, N, N)."""
    scores = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else scores + bias
    return scores.softmax(dim=-1)


def install(attention_modules: list[nn.Module], blocks: list[nn.Module]) -> list[torch.utils.hooks.RemovableHandle]:
    """Tell each attention module its block index; hook each block's output (B, N, C) for `features`."""
    handles = []
    for i, (attn, blk) in enumerate(zip(attention_modules, blocks)):
        setattr(attn, _BLOCK, i)
        handles.append(blk.register_forward_hook(_on_block_output(i)))
    return handles


def _on_block_output(i: int):
    def hook(_mod, _inp, out) -> None:
        store = capture._ACTIVE.get()
        if store is not None and i in store.feature_layers:
            store.features[i] = out[0] if isinstance(out, tuple) else out

    return hook
