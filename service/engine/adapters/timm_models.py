"""timm: the attention adapters (ViT `Attention`, EVA `EvaAttention`, BEiT `Attention`, the MAP head
`AttentionPoolLatent`) and the anatomy of timm's transformer classifiers (VisionTransformer and its
distilled kind, Eva, Beit). Each split/merge pair is that module's own forward, cut at a @ v."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from timm.data import ImageNetInfo
from timm.layers import Attention, AttentionPoolLatent
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models.beit import Attention as BeitAttention
from timm.models.eva import EvaAttention
from torch import nn

from service.engine.adapters.base import (
    QKV,
    Adapter,
    Anatomy,
    UnsupportedModel,
    attention_of,
    register_adapter,
    register_source,
)


def _heads(x: torch.Tensor, m: nn.Module, parts: int) -> tuple[torch.Tensor, ...]:
    """(B, N, parts * H * D) -> parts tensors (B, H, N, D)."""
    b, n, _ = x.shape
    return x.reshape(b, n, parts, m.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _causal(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def _mask(x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor | None:
    return _causal(x.shape[1], x.device) if is_causal else attn_mask


# -- timm.layers.Attention (ViT, DeiT, DeiT III, register-token ViTs) ---------------------------------------
def _vit_split(m: Attention, x, attn_mask=None, is_causal=False) -> QKV:
    q, k, v = _heads(m.qkv(x), m, 3)
    return QKV(m.q_norm(q), m.k_norm(k), v, _mask(x, attn_mask, is_causal))


def _vit_merge(m: Attention, o, x, attn_mask=None, is_causal=False) -> torch.Tensor:
    b, n, _ = x.shape
    o = m.norm(o.transpose(1, 2).reshape(b, n, -1))
    gate = getattr(m, "gate", None)
    if gate is not None:
        o = o * gate(x).sigmoid()
    return m.proj_drop(m.proj(o))


# -- timm.models.eva.EvaAttention (EVA02: rotary position embedding on the patch tokens) ------------------
def _qkv_biased(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """EVA / BEiT: one qkv projection whose bias is q_bias, a zero k bias and v_bias."""
    if m.q_bias is None:
        return m.qkv(x)
    bias = torch.cat((m.q_bias, m.k_bias, m.v_bias))
    return m.qkv(x) + bias if getattr(m, "qkv_bias_separate", False) else F.linear(x, m.qkv.weight, bias)


def _eva_split(m: EvaAttention, x, rope=None, attn_mask=None, is_causal=False) -> QKV:
    b, n, _ = x.shape
    if m.qkv is not None:
        q, k, v = _heads(_qkv_biased(m, x), m, 3)
    else:
        q, k, v = (p(x).reshape(b, n, m.num_heads, -1).transpose(1, 2) for p in (m.q_proj, m.k_proj, m.v_proj))
    q, k = m.q_norm(q), m.k_norm(k)
    if rope is not None:
        p, half = m.num_prefix_tokens, getattr(m, "rotate_half", False)
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=half)], dim=2).type_as(v)
    return QKV(q, k, v, _mask(x, attn_mask, is_causal))


def _eva_merge(m: EvaAttention, o, x, rope=None, attn_mask=None, is_causal=False) -> torch.Tensor:
    return _vit_merge(m, o, x)


# -- timm.models.beit.Attention (relative position bias, own or shared) ---------------------------------
def _beit_split(m: BeitAttention, x, shared_rel_pos_bias=None) -> QKV:
    q, k, v = _heads(_qkv_biased(m, x), m, 3)
    bias = m._get_rel_pos_bias() if m.relative_position_bias_table is not None else None
    if shared_rel_pos_bias is not None:
        bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
    return QKV(q, k, v, bias)


def _beit_merge(m: BeitAttention, o, x, shared_rel_pos_bias=None) -> torch.Tensor:
    b, n, _ = x.shape
    return m.proj_drop(m.proj(o.transpose(1, 2).reshape(b, n, -1)))


# -- timm.layers.AttentionPoolLatent (the MAP head: a latent query attends to the tokens) ---------------
def _map_split(m: AttentionPoolLatent, x, attn_mask=None) -> QKV:
    b = x.shape[0]
    if m.pos_embed is not None:
        x = x + m.pos_embed.unsqueeze(0).to(x.dtype)
    q = m.q(m.latent.expand(b, -1, -1)).reshape(b, m.latent_len, m.num_heads, m.head_dim).transpose(1, 2)
    k, v = _heads(m.kv(x), m, 2)
    return QKV(m.q_norm(q), m.k_norm(k), v, attn_mask)


def _map_merge(m: AttentionPoolLatent, o, x, attn_mask=None) -> torch.Tensor:
    o = m.proj_drop(m.proj(o.transpose(1, 2).reshape(x.shape[0], m.latent_len, -1)))
    if m.mlp is not None:
        o = o + m.mlp(m.norm(o))
    return o[:, 0] if m.pool == "token" else o.mean(1) if m.pool == "avg" else o


def _one_latent(m: AttentionPoolLatent) -> str | None:
    return None if m.latent_len == 1 else f"{m.latent_len} latent queries (one explained row needs one)"


register_adapter(Adapter("timm.Attention", Attention, _vit_split, _vit_merge))
register_adapter(Adapter("timm.EvaAttention", EvaAttention, _eva_split, _eva_merge))
register_adapter(Adapter("timm.BeitAttention", BeitAttention, _beit_split, _beit_merge))
register_adapter(Adapter("timm.AttentionPoolLatent", AttentionPoolLatent, _map_split, _map_merge, _one_latent))


# -- the anatomy of a timm transformer ------------------------------------------------------------------
def describe(model: nn.Module) -> Anatomy | None:
    if not type(model).__module__.startswith("timm."):
        return None
    name = type(model).__name__
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0 or not hasattr(model, "patch_embed"):
        raise UnsupportedModel(f"{name} has no `blocks` of global self-attention over patch tokens (windowed "
                               "attention such as Swin's and convolutional models cannot be explained)")
    attns = []
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        if attn is None:
            raise UnsupportedModel(f"{name} block {i} ({type(blk).__name__}) has no `attn` module")
        attention_of(attn)  # raises naming the class when no adapter knows it
        attns.append(attn)
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    pool = getattr(model, "attn_pool", None)
    include_prefix = bool(getattr(model, "pool_include_prefix", False))
    if pool is not None:
        attention_of(pool)
        pooling = "map"
    else:
        pooling = getattr(model, "global_pool", "token")
        if pooling == "token" and getattr(model, "cls_token", None) is None:
            raise UnsupportedModel(f"{name} pools token 0 but has no class token")
        if pooling not in ("token", "avg") or (pooling == "avg" and include_prefix):
            raise UnsupportedModel(f"{name} pools with global_pool={pooling!r}"
                                   f"{' over its prefix tokens too' if include_prefix else ''}: "
                                   "explained: class token ('token'), patch mean ('avg'), attention pooling ('map')")
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    # (H, W) the model takes. Not grid x patch: a hybrid ViT's conv stem shrinks the image before its
    # patch projection (vit_tiny_r_s16_p8_224: 224 -> 56 px features -> 8 px patches -> 7 x 7 grid).
    img_size = getattr(model.patch_embed, "img_size", None)
    if img_size is None:  # dynamic-size embeddings record none; their patches tile the input
        img_size = [g * p for g, p in zip(grid, model.patch_embed.patch_size)]
    cfg = timm.data.resolve_model_data_config(model)
    a0 = attns[0]
    heads = int(a0.num_heads)
    head_dim = int(getattr(a0, "head_dim", 0) or a0.qkv.out_features // (3 * heads))
    return Anatomy(
        source="timm", family=name, blocks=list(blocks), attentions=attns, pool=pool, grid=grid, prefix=prefix,
        pooling=pooling, input_size=tuple(int(s) for s in img_size), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
        labels=tuple(class_labels(model)), heads=heads, head_dim=head_dim, embed_dim=int(model.embed_dim),
        forward=model, interpolation=cfg.get("interpolation", "bicubic"),
        # VisionTransformer's head drops the prefix tokens before its pool unless told not to; Eva's keeps them
        pool_skip=prefix if pool is not None and hasattr(model, "pool_include_prefix") and not include_prefix else 0,
    )


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


register_source("timm", describe)
