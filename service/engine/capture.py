"""Capture what every attention of a model computes, in the forward pass itself, through its adapter.

Each attention module the model's anatomy names (service/engine/adapters: one adapter per attention
implementation) gets, once, when the model is loaded, an instance `forward` of its own:

    nothing captured, or not this module      the module's own forward, as shipped (fused kernel)
    captured                                  split -> q, k, v, bias     (the adapter: the module's forward
                                              a = softmax(q k^T * scale + bias)    up to its attention product)
                                              o = a @ v                  (here, explicit)
                                              merge(o) -> the output     (the adapter: the rest of its forward)

so the model multiplies v by exactly the tensor we keep: the captured attention is the one the model used,
after any relative position bias and rotary embedding, computed once, and autograd can differentiate the
output with respect to it. Blocks are numbered 0 .. L-1; an attention-pooling head is block L.

Two ways to receive the attention:
  kept     store.attn[block] = a (B, H, Nq, N), whole; what autograd needs (gradient rollout)
  taken    take(block, rows, a[rows]) for chunks of images, and nothing is kept: the caller
           reduces each chunk at once (fuses the heads) while it is in cache. On the CPU a chunk
           is one image: its q, k and v are strided views into the qkv projection that BLAS
           takes as they are, where a batch of them would first be copied, and its attention
           (DeiT-Tiny: 466 KB) stays in L2. On an accelerator a chunk is the whole batch.

Block outputs (B, N, C) and the MLPs' hidden units before their activation (the output of
`mlp.fc1`, (B, N, 4C)) are hooked too, for activation maximization of a unit.

The capture state lives in a ContextVar, never on the shared modules, so concurrent batches on
different threads cannot race; outside `capture(...)` a module pays one ContextVar read per call.
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from service.engine.adapters.base import Adapter, Anatomy, UnsupportedModel

__all__ = ["CPU_CHUNK", "Capture", "UnsupportedModel", "attend", "capture", "install"]

# Images per chunk of taken attention on the CPU (see the module docstring).
CPU_CHUNK = 1

# take(block, rows, attn): attn (len(rows), H, Nq, N) post-softmax, for the batch rows `rows`
Take = Callable[[int, slice, torch.Tensor], None]


@dataclass
class Capture:
    """Tensors captured during one forward pass, keyed by block index.

    `attn_layers` / `qk_layers` say which blocks capture their attention or their q and k.
    With `take`, attention is handed to it chunk by chunk instead of kept in `attn`.
    """

    attn_layers: frozenset[int] = frozenset()
    qk_layers: frozenset[int] = frozenset()
    feature_layers: frozenset[int] = frozenset()
    attn: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, H, Nq, N) post-softmax
    q: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, H, Nq, D) as it enters q k^T
    k: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, H, N, D) as it enters q k^T
    features: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, N, C) the block's output
    mlp_layers: frozenset[int] = frozenset()
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, N, hidden) mlp.fc1's output
    take: Take | None = None


_ACTIVE: contextvars.ContextVar[Capture | None] = contextvars.ContextVar("vit_capture", default=None)


def _attend(store: Capture, block: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """o = softmax(q k^T * scale + mask) v, the attention kept or handed to `take` in chunks:
    q (B, H, Nq, D), k (B, H, N, D), v (B, H, N, Dv) -> (B, H, Nq, Dv)."""
    if store.take is None:
        attn = _softmax_attention(q, k, scale, mask)  # (B, H, Nq, N)
        store.attn[block] = attn
        return attn @ v
    b, h, nq, _ = q.shape
    # (B, Nq, H, Dv) in memory: the model's next step, o.transpose(1, 2).reshape(B, Nq, H * Dv), is a view
    out = v.new_empty(b, nq, h, v.shape[-1]).transpose(1, 2)
    step = CPU_CHUNK if q.device.type == "cpu" else b
    for start in range(0, b, step):
        rows = slice(start, min(start + step, b))
        attn = _softmax_attention(q[rows], k[rows], scale, _rows_of(mask, rows))
        out[rows] = attn @ v[rows]
        store.take(block, rows, attn)
    return out


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T * scale [+ mask]): (B, H, Nq, D), (B, H, N, D) -> (B, H, Nq, N)."""
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
    """Within this block, forward passes of installed models on this thread record into the Capture.

    With `take`, the attention of `attn_layers` goes to it in chunks and is not kept; use it only
    where no gradient flows through the attention.
    """
    store = Capture(attn_layers=attn_layers, qk_layers=qk_layers, feature_layers=feature_layers, take=take,
                    mlp_layers=mlp_layers)
    token = _ACTIVE.set(store)
    try:
        yield store
    finally:
        _ACTIVE.reset(token)


class Installed:
    """The capture installed on a model's modules; `remove()` gives them back their own forward."""

    def __init__(self) -> None:
        self.modules: list[nn.Module] = []
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []

    def remove(self) -> None:
        for m in self.modules:
            m.__dict__.pop("forward", None)
        for h in self.hooks:
            h.remove()


def install(anatomy: Anatomy) -> Installed:
    """Give every attention module of the anatomy (blocks 0 .. L-1, then the pooling head as block L)
    its capturing forward, and hook every block's output. Once per model."""
    done = Installed()
    mods = list(anatomy.attentions) + ([anatomy.pool] if anatomy.pool is not None else [])
    for i, mod in enumerate(mods):
        adapter = anatomy.adapter(mod)
        if adapter.bind is not None:  # it calls `attend` from its own attention function
            adapter.bind(mod, i)
            continue
        # bound to the module, so that a deep copy of the model binds its copy (copy.deepcopy rebinds methods)
        mod.forward = types.MethodType(_adapted(i, adapter), mod)
        done.modules.append(mod)
    for i, blk in enumerate(anatomy.blocks):
        done.hooks.append(blk.register_forward_hook(_on_block_output(i)))
        fc1 = getattr(getattr(blk, "mlp", None), "fc1", None)  # the MLP's first layer (timm and transformers)
        if fc1 is not None:
            done.hooks.append(fc1.register_forward_hook(_on_mlp_hidden(i)))
    return done


def _adapted(i: int, adapter: Adapter) -> Callable[..., torch.Tensor]:
    def forward(mod: nn.Module, *args, **kwargs) -> torch.Tensor:
        store = _ACTIVE.get()
        if store is None or (i not in store.attn_layers and i not in store.qk_layers):
            return type(mod).forward(mod, *args, **kwargs)  # the module's own
        q, k, v, mask, scale = adapter.split(mod, *args, **kwargs)
        if i in store.qk_layers:
            store.q[i], store.k[i] = q, k
        scale = scale or q.shape[-1] ** -0.5
        if i in store.attn_layers:
            o = _attend(store, i, q, k, v, mask, scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return adapter.merge(mod, o, *args, **kwargs)

    return forward


def attend(block: int | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
           scale: float | None) -> torch.Tensor | None:
    """For an adapter with `bind` (its module calls an attention function of ours, not a replaced forward):
    records q and k (B, H, Nq, D) where this block's are wanted and, where its attention is captured,
    returns o = softmax(q k^T * scale + bias) v (B, H, Nq, Dv) as `_adapted` computes it; None where it is
    not (the caller runs its own kernel)."""
    store = _ACTIVE.get()
    if store is None or block is None:
        return None
    if block in store.qk_layers:
        store.q[block], store.k[block] = q, k
    if block not in store.attn_layers:
        return None
    return _attend(store, block, q, k, v, bias, scale or q.shape[-1] ** -0.5)


def _on_mlp_hidden(i: int):
    def hook(_mod, _inp, out: torch.Tensor) -> None:
        store = _ACTIVE.get()
        if store is not None and i in store.mlp_layers:
            store.mlp[i] = out

    return hook


def _on_block_output(i: int):
    def hook(_mod, _inp, out) -> None:
        store = _ACTIVE.get()
        if store is not None and i in store.feature_layers:
            store.features[i] = out[0] if isinstance(out, tuple) else out

    return hook
