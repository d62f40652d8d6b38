"""Capture what every attention block of a timm ViT computes, without changing how it computes it.

The model keeps running exactly as timm ships it, fused `scaled_dot_product_attention`
included: there is no post-softmax tensor to hook there, so instead we hook the pieces that
exist in both the fused and the unfused path of `timm.layers.Attention.forward`:

    qkv = self.qkv(x)               -> forward hook on `qkv`:     v   (B, H, N, D)
    q, k = q_norm(q), k_norm(k)      -> forward hooks on the norms: q, k (B, H, N, D)
    o = softmax(q k^T * scale) @ v  -> (fused or not)
    self.norm(o.reshape(B, N, H*D)) -> forward pre-hook on `norm`: o   (B, N, H*D)

From q and k the post-softmax attention is recomputed exactly (A = softmax(q k^T * scale)),
and, because A reaches the output only through o = A v, the gradient of any scalar y with
respect to A is dy/dA = (dy/do) v^T. So the engine never needs an unfused model.

Hooks are registered once, when a model is loaded, and do nothing unless the calling thread
is inside `capture(...)`: the capture state lives in a ContextVar, never on the shared
modules, so concurrent batches on different threads cannot race.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from timm.layers import Attention


class UnsupportedModel(ValueError):
    """The model lacks what the explanation methods need (class token, timm Attention blocks)."""


@dataclass
class Capture:
    """Tensors captured during one forward pass, one list entry per block.

    `layers` limits which blocks store anything (None: all). `keep_o` also keeps the
    attention output o, needed for gradients with respect to the attention.
    """

    layers: frozenset[int] | None = None
    keep_o: bool = False
    q: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, H, N, D) after q_norm
    k: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, H, N, D) after k_norm
    v: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, H, N, D)
    o: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, N, H*D), softmax(qk^T)v

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers


_ACTIVE: contextvars.ContextVar[Capture | None] = contextvars.ContextVar("vit_capture", default=None)


@contextlib.contextmanager
def capture(layers: frozenset[int] | None = None, keep_o: bool = False) -> Iterator[Capture]:
    """Within this block, forward passes of hooked models on this thread record into the Capture."""
    store = Capture(layers=layers, keep_o=keep_o)
    token = _ACTIVE.set(store)
    try:
        yield store
    finally:
        _ACTIVE.reset(token)


def attention_modules(model: nn.Module) -> list[Attention]:
    """The attention module of every block, or UnsupportedModel saying why there are none."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise UnsupportedModel(f"{type(model).__name__} has no `blocks`: not a timm VisionTransformer")
    mods = []
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        if not isinstance(attn, Attention):
            raise UnsupportedModel(
                f"block {i} attention is {type(attn).__name__}, not timm.layers.Attention "
                "(rope, differential or parallel attention blocks are not supported)"
            )
        mods.append(attn)
    if getattr(model, "cls_token", None) is None:
        raise UnsupportedModel("model has no class token: rollout reads the class token's attention row")
    if getattr(model, "global_pool", "token") != "token":
        raise UnsupportedModel(
            f"model pools with global_pool={model.global_pool!r}; the methods explain class-token models"
        )
    return mods


def install_hooks(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Register the capture hooks on every block once. Returns the handles."""
    handles = []
    for i, attn in enumerate(attention_modules(model)):
        handles += _hook_block(i, attn)
    return handles


def _hook_block(i: int, attn: Attention) -> list[torch.utils.hooks.RemovableHandle]:
    heads, head_dim = attn.num_heads, attn.head_dim

    def on_qkv(_mod, _inp, out: torch.Tensor) -> None:
        store = _ACTIVE.get()
        if store is not None and store.wants(i):
            b, n, _ = out.shape  # (B, N, 3*H*D)
            store.v[i] = out.view(b, n, 3, heads, head_dim)[:, :, 2].transpose(1, 2)

    def on_q(_mod, _inp, out: torch.Tensor) -> None:
        store = _ACTIVE.get()
        if store is not None and store.wants(i):
            store.q[i] = out

    def on_k(_mod, _inp, out: torch.Tensor) -> None:
        store = _ACTIVE.get()
        if store is not None and store.wants(i):
            store.k[i] = out

    def on_o(_mod, inp: tuple[torch.Tensor, ...]) -> None:
        store = _ACTIVE.get()
        if store is not None and store.keep_o and store.wants(i):
            store.o[i] = inp[0]

    return [
        attn.qkv.register_forward_hook(on_qkv),
        attn.q_norm.register_forward_hook(on_q),
        attn.k_norm.register_forward_hook(on_k),
        attn.norm.register_forward_pre_hook(on_o),
    ]


def attention_from_qk(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Post-softmax attention (B, H, N, N) from q, k (B, H, N, D), as timm's unfused path computes it."""
    return torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)
