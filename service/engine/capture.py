"""Capture what every attention block of a timm ViT computes, in the forward pass itself.

timm's `Attention.forward` has two paths:

    q, k = q_norm(q), k_norm(k)                       both paths: hooked -> q, k (B, H, N, D)
    fused:   o = F.scaled_dot_product_attention(q, k, v)      no post-softmax tensor exists
    unfused: a = softmax(q*scale @ k^T); a = attn_drop(a); o = a @ v    hooked -> a

For the fused path (timm's default), while capturing, a thread-local TorchFunctionMode answers
the model's call to `scaled_dot_product_attention` with the same attention written out:
a = softmax(q k^T * scale), o = a @ v. The model then multiplies v by exactly the tensor we
keep, so the captured attention is the one the model used, computed once, and autograd can
differentiate the output with respect to it. Outside `capture(...)` nothing changes: the
fused kernel runs as shipped.

Two ways to receive the attention:
  kept     store.attn[block] = a (B, H, N, N), whole; what autograd needs (gradient rollout)
  taken    take(block, rows, a[rows]) for chunks of images, and nothing is kept: the caller
           reduces each chunk at once (fuses the heads) while it is in cache. On the CPU a chunk
           is one image: its q, k and v are strided views into the qkv projection that BLAS
           takes as they are, where a batch of them would first be copied, and its attention
           (DeiT-Tiny: 466 KB) stays in L2. On an accelerator a chunk is the whole batch.

Block outputs (B, N, C) and the MLPs' hidden units before their activation (the output of
`mlp.fc1`, (B, N, 4C)) are hooked too, for activation maximization of a unit.

Hooks are registered once, when a model is loaded; the capture state lives in a ContextVar and
the function mode on the calling thread only, never on the shared modules, so concurrent
batches on different threads cannot race.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn
from torch.overrides import TorchFunctionMode

# Images per chunk of taken attention on the CPU (see the module docstring).
CPU_CHUNK = 1

# take(block, rows, attn): attn (len(rows), H, N, N) post-softmax, for the batch rows `rows`
Take = Callable[[int, slice, torch.Tensor], None]


class UnsupportedModel(ValueError):
    """The model lacks what the explanation methods need (class token, timm Attention blocks)."""


@dataclass
class Capture:
    """Tensors captured during one forward pass, keyed by block index.

    `attn_layers` / `qk_layers` say which blocks capture their attention or their q and k.
    With `take`, attention is handed to it chunk by chunk instead of kept in `attn`.
    """

    attn_layers: frozenset[int] = frozenset()
    qk_layers: frozenset[int] = frozenset()
    feature_layers: frozenset[int] = frozenset()
    attn: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, H, N, N) post-softmax
    q: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, H, N, D) after q_norm
    k: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, H, N, D) after k_norm
    features: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, N, C) the block's output
    mlp_layers: frozenset[int] = frozenset()
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, N, hidden) mlp.fc1's output
    block: int | None = None  # the block whose attention runs next
    take: Take | None = None


_ACTIVE: contextvars.ContextVar[Capture | None] = contextvars.ContextVar("vit_capture", default=None)


class _ExplicitAttention(TorchFunctionMode):
    """Answers fused attention calls of blocks whose attention is wanted with explicit math."""

    def __init__(self, store: Capture) -> None:
        super().__init__()
        self.store = store

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        block = self.store.block
        if func is not F.scaled_dot_product_attention or block not in self.store.attn_layers:
            return func(*args, **kwargs)
        self.store.block = None  # one attention call per block
        q, k, v = args[:3]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        if kwargs.get("is_causal") or kwargs.get("dropout_p", 0.0) or kwargs.get("enable_gqa"):
            raise UnsupportedModel("causal, dropout or grouped-query attention cannot be captured")
        scale = kwargs.get("scale") or q.shape[-1] ** -0.5
        if self.store.take is None:
            attn = _softmax_attention(q, k, scale, mask)  # (B, H, N, N)
            self.store.attn[block] = attn
            return attn @ v
        b, h, n, _ = q.shape
        # (B, N, H, Dv) in memory: the model's next step, o.transpose(1, 2).reshape(B, N, H * Dv), is a view
        out = v.new_empty(b, n, h, v.shape[-1]).transpose(1, 2)
        step = CPU_CHUNK if q.device.type == "cpu" else b
        for start in range(0, b, step):
            rows = slice(start, min(start + step, b))
            attn = _softmax_attention(q[rows], k[rows], scale, _rows_of(mask, rows))
            out[rows] = attn @ v[rows]
            self.store.take(block, rows, attn)
        return out


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T * scale [+ mask]): (B, H, N, D) x2 -> (B, H, N, N)."""
    scores = (q * scale) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(dim=-1)


def _rows_of(mask: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """The mask for a chunk of images: masks broadcast over a batch dimension of 1 or B."""
    if mask is None or mask.dim() < 4 or mask.shape[0] == 1:
        return mask
    return mask[rows]


@contextlib.contextmanager
def capture(
    attn_layers: frozenset[int] = frozenset(),
    qk_layers: frozenset[int] = frozenset(),
    take: Take | None = None,
    feature_layers: frozenset[int] = frozenset(),
    mlp_layers: frozenset[int] = frozenset(),
) -> Iterator[Capture]:
    """Within this block, forward passes of hooked models on this thread record into the Capture.

    With `take`, the attention of `attn_layers` goes to it in chunks and is not kept; use it only
    where no gradient flows through the attention.
    """
    store = Capture(attn_layers=attn_layers, qk_layers=qk_layers, feature_layers=feature_layers, take=take,
                    mlp_layers=mlp_layers)
    token = _ACTIVE.set(store)
    try:
        if attn_layers:
            with _ExplicitAttention(store):
                yield store
        else:
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
        handles.append(model.blocks[i].register_forward_hook(_on_block_output(i)))
        fc1 = getattr(getattr(model.blocks[i], "mlp", None), "fc1", None)
        if fc1 is not None:
            handles.append(fc1.register_forward_hook(_on_mlp_hidden(i)))
    return handles


def _on_mlp_hidden(i: int):
    def hook(_mod, _inp, out: torch.Tensor) -> None:
        store = _ACTIVE.get()
        if store is not None and i in store.mlp_layers:
            store.mlp[i] = out

    return hook


def _on_block_output(i: int):
    def hook(_mod, _inp, out: torch.Tensor) -> None:
        store = _ACTIVE.get()
        if store is not None and i in store.feature_layers:
            store.features[i] = out

    return hook


def _hook_block(i: int, attn: Attention) -> list[torch.utils.hooks.RemovableHandle]:
    def on_q(_mod, _inp, out: torch.Tensor) -> None:
        store = _ACTIVE.get()
        if store is not None:
            store.block = i  # q_norm runs right before this block's attention, in both paths
            if i in store.qk_layers:
                store.q[i] = out

    def on_k(_mod, _inp, out: torch.Tensor) -> None:
        store = _ACTIVE.get()
        if store is not None and i in store.qk_layers:
            store.k[i] = out

    def on_unfused_attn(_mod, _inp, out: torch.Tensor) -> None:
        store = _ACTIVE.get()
        if store is None or i not in store.attn_layers:
            return
        if store.take is not None:
            store.take(i, slice(0, out.shape[0]), out)
        else:
            store.attn[i] = out  # the unfused path: the tensor the model multiplies v with

    return [
        attn.q_norm.register_forward_hook(on_q),
        attn.k_norm.register_forward_hook(on_k),
        attn.attn_drop.register_forward_hook(on_unfused_attn),
    ]
