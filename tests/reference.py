"""An independent, dense float64 reference for every map the service returns.

Written from the definitions in docs/how-it-works.md, not from the engine: a float64 copy of the model
whose attention modules are replaced by this file's own attention functions, one per family (ViT,
EVA02 with its rotary embedding, BEiT with its relative position bias, the MAP pooling head), each
written from its definition, o = softmax(q k^T * scale + bias) v, recording a, q and k as the model
uses them; gradients by autograd on those very tensors, full N x N matrix products, a full stable sort
for the discard, and the explained row from what the classifier reads. Slow and simple on purpose.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms


def preprocess(img: Image.Image, model) -> torch.Tensor:
    """Squash-resize the whole image to the input size and normalise with the model's statistics."""
    cfg = model.pretrained_cfg
    h, w = cfg["input_size"][1:]
    t = transforms.Compose(
        [
            transforms.Resize((h, w), interpolation=transforms.InterpolationMode(cfg.get("interpolation", "bicubic"))),
            transforms.ToTensor(),
            transforms.Normalize(cfg["mean"], cfg["std"]),
        ]
    )
    return t(img.convert("RGB"))


@dataclass
class Captured:
    logits: torch.Tensor  # (C,)
    attn: list[torch.Tensor]  # per layer (H, N, N), post-softmax
    q: list[torch.Tensor]  # per layer (H, N, D), after q_norm (and the rotary embedding), before scaling
    k: list[torch.Tensor]
    grads: list[torch.Tensor] | None = None  # per layer d logit_c / d attn, (H, N, N)
    pool: torch.Tensor | None = None  # a MAP head's attention (H, 1, N'), N' the tokens it reads
    pool_grad: torch.Tensor | None = None  # (H, 1, N')


def fuse(x: torch.Tensor, fusion: str) -> torch.Tensor:
    """Over the head dimension (dim 0)."""
    return {"mean": lambda: x.mean(0), "max": lambda: x.max(0).values, "min": lambda: x.min(0).values}[fusion]()


def discard(f: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the floor(ratio*N*N) smallest entries, except [0, 0]."""
    n = f.shape[0]
    flat = f.flatten().clone()
    order = torch.argsort(flat, stable=True)[: math.floor(ratio * n * n)]
    flat[order[order != 0]] = 0
    return flat.view(n, n)


class Reference:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = copy.deepcopy(model).double().eval()
        self.prefix = int(getattr(self.model, "num_prefix_tokens", 0))
        self.grid = tuple(int(g) for g in self.model.patch_embed.grid_size)
        pool = getattr(self.model, "attn_pool", None)
        # what the classifier reads: the class token, the mean of the patch tokens, or a pooling head
        self.pooling = "map" if pool is not None else getattr(self.model, "global_pool", "token")
        # VisionTransformer's MAP head reads the patch tokens only (unless pool_include_prefix); EVA's reads all
        self.skip = self.prefix if pool is not None and not getattr(self.model, "pool_include_prefix", True) else 0
        self._attn: list[torch.Tensor] = []
        self._q: list[torch.Tensor] = []
        self._k: list[torch.Tensor] = []
        self._pool: list[torch.Tensor] = []
        for blk in self.model.blocks:  # this private copy only
            own = ATTENTION[type(blk.attn).__module__, type(blk.attn).__name__]
            blk.attn.forward = functools.partial(own, self, blk.attn)
        if pool is not None:
            pool.forward = functools.partial(_map_head, self, pool)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                bias: torch.Tensor | None = None, store: list | None = None) -> torch.Tensor:
        """softmax(q k^T * scale + bias) v, recording the softmax (B, H, Nq, N): the tensor that multiplies v."""
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
        if bias is not None:
            scores = scores + bias
        a = torch.softmax(scores, dim=-1)
        (self._attn if store is None else store).append(a)
        return torch.einsum("bhqk,bhkd->bhqd", a, v)

    def _clear(self) -> None:
        for store in (self._attn, self._q, self._k, self._pool):
            store.clear()

    def run(self, x: torch.Tensor, category: int | None = None) -> Captured:
        """x (3, H, W). With a category, also the gradient of its logit w.r.t. every attention."""
        self._clear()
        self.model.requires_grad_(category is not None)
        with torch.set_grad_enabled(category is not None):
            logits = self.model(x[None].double())[0]
        attn = list(self._attn) + list(self._pool)
        grads = None
        if category is not None:
            for a in attn:
                a.retain_grad()
            logits[category].backward()
            grads = [a.grad[0] for a in attn]
            self.model.zero_grad(set_to_none=True)
        layers = len(self._attn)
        return Captured(
            logits=logits.detach(),
            attn=[a.detach()[0] for a in attn[:layers]],
            q=[q.detach()[0] for q in self._q],
            k=[k.detach()[0] for k in self._k],
            grads=grads[:layers] if grads else None,
            pool=attn[layers].detach()[0] if self._pool else None,
            pool_grad=grads[layers] if grads and self._pool else None,
        )

    # -- the maps, from the definitions --------------------------------------------------------
    def explained(self, n: int, pool_row: torch.Tensor | None = None) -> torch.Tensor:
        """The row of R a map reads (N,): the class token's (e_0) for a class-token head, the mean of the patch
        tokens' rows for a patch-mean head, the pooling head's row (as the method weighs it) for a MAP head."""
        e = torch.zeros(n, dtype=torch.float64)
        if self.pooling == "map":
            e[self.skip :] = pool_row
        elif self.pooling == "avg":
            e[self.prefix :] = 1.0 / (n - self.prefix)
        else:
            e[0] = 1.0
        return e

    def _rollout(self, weights: list[torch.Tensor], start_layer: int = 0, e: torch.Tensor | None = None) -> np.ndarray:
        n = weights[0].shape[0]
        eye = torch.eye(n, dtype=torch.float64)
        r = eye.clone()
        for w in weights[start_layer:]:
            a = w + eye
            a = a / a.sum(dim=-1, keepdim=True)  # rows sum to 1
            r = a @ r  # R = Â_l ... Â_s
        return self._mask((eye[0] if e is None else e) @ r)

    def _mask(self, row: torch.Tensor) -> np.ndarray:
        m = row[self.prefix :].reshape(self.grid)
        return (m / m.max() if m.max() > 0 else m).numpy()

    def rollout(self, c: Captured, fusion: str = "max", ratio: float = 0.9, start_layer: int = 0) -> np.ndarray:
        """A MAP head's row: its attention fused over heads (no discard, no + I)."""
        e = self.explained(c.attn[0].shape[-1], fuse(c.pool, fusion)[0] if c.pool is not None else None)
        return self._rollout([discard(fuse(a, fusion), ratio) for a in c.attn], start_layer, e)

    def grad_rollout(self, c: Captured, fusion: str = "mean", ratio: float = 0.9, start_layer: int = 0) -> np.ndarray:
        """A MAP head's row: max(fuse(a_pool * grad), 0) (no discard, no + I)."""
        assert c.grads is not None
        pool = fuse(c.pool * c.pool_grad, fusion).clamp(min=0)[0] if c.pool is not None else None
        weights = [discard(fuse(a * g, fusion).clamp(min=0), ratio) for a, g in zip(c.attn, c.grads)]
        return self._rollout(weights, start_layer, self.explained(c.attn[0].shape[-1], pool))

    def gae(self, c: Captured, start_layer: int = 0) -> np.ndarray:
        """Chefer et al. 2021: R = I; for each block in order R = R + mean_h(max(dA * A, 0)) R; the map is the
        explained row of R (a MAP head's: mean_h max(grad * a_pool, 0), no + I)."""
        assert c.grads is not None
        n = c.attn[0].shape[-1]
        r = torch.eye(n, dtype=torch.float64)
        for a, g in list(zip(c.attn, c.grads))[start_layer:]:
            abar = (g * a).clamp(min=0).mean(0)
            r = r + abar @ r
        pool = (c.pool_grad * c.pool).clamp(min=0).mean(0)[0] if c.pool is not None else None
        return self._mask(self.explained(n, pool) @ r)

    def attention(self, c: Captured, head) -> np.ndarray:
        """Per block the explained row's attention: the class token's row, or the mean of the patch tokens'
        rows; a MAP head adds its own attention as one more map."""
        rows = [a[:, 0] if self.pooling == "token" else a[:, self.prefix :].mean(1) for a in c.attn]  # (H, N)
        if c.pool is not None:
            n = c.attn[0].shape[-1]
            before = torch.zeros(c.pool.shape[0], n - c.pool.shape[-1], dtype=torch.float64)
            rows.append(torch.cat([before, c.pool[:, 0]], dim=-1))
        maps = []
        for row in rows:
            m = (row[head] if isinstance(head, int) else fuse(row, head))[self.prefix :].reshape(self.grid)
            maps.append((m / m.max()).numpy())
        return np.stack(maps)

    def qk(self, c: Captured, layer: int, head: int, channel: int, which: str) -> np.ndarray:
        t = (c.q if which == "q" else c.k)[layer]
        return torch.sigmoid(t[head, self.prefix :, channel]).reshape(self.grid).numpy()

    def unit(self, x: torch.Tensor, target: str, category_id: int = 0, layer: int = 0, head: int = 0,
             channel: int = 0) -> tuple[float, torch.Tensor]:
        """Activation maximization's objective for x (3, H, W) *pixels* in [0, 1], and its gradient
        w.r.t. those pixels, in float64: the class logit, a block output's channel averaged over the
        patch tokens, an MLP hidden unit before its activation (W1 . norm2(x) + b1, from the block's
        second norm's output and the first MLP layer's weights) averaged over the patch tokens, or one
        head's q or k channel averaged over the patch tokens."""
        cfg = self.model.pretrained_cfg
        mean = torch.tensor(cfg["mean"], dtype=torch.float64)[:, None, None]
        std = torch.tensor(cfg["std"], dtype=torch.float64)[:, None, None]
        px = x.double().clone().requires_grad_(True)
        out = {}
        hook = self.model.blocks[layer].register_forward_hook(lambda m, i, o: out.setdefault("features", o))
        norm2 = self.model.blocks[layer].norm2.register_forward_hook(lambda m, i, o: out.setdefault("mlp_in", o))
        try:
            self._clear()
            with torch.enable_grad():
                logits = self.model(((px - mean) / std)[None])[0]
                if target == "class":
                    value = logits[category_id]
                elif target == "features":
                    value = out["features"][0, self.prefix :, channel].mean()
                elif target == "mlp":
                    fc1 = self.model.blocks[layer].mlp.fc1
                    hidden = out["mlp_in"][0, self.prefix :] @ fc1.weight[channel] + fc1.bias[channel]  # (N - P,)
                    value = hidden.mean()
                else:
                    t = (self._q if target == "q" else self._k)[layer][0]  # (H, N, D)
                    value = t[head, self.prefix :, channel].mean()
                (grad,) = torch.autograd.grad(value, px)
        finally:
            hook.remove()
            norm2.remove()
        return float(value.detach()), grad

    def predictions(self, c: Captured, k: int = 5) -> list[tuple[int, float]]:
        p = torch.softmax(c.logits, -1)
        s, i = p.topk(min(k, p.numel()))
        return list(zip(i.tolist(), s.tolist()))


# -- each family's attention module, from its definition: o = softmax(q k^T * scale + bias) v ------------
def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H * D) -> (B, H, N, D)."""
    b, n, _ = t.shape
    return t.reshape(b, n, heads, -1).transpose(1, 2)


def _rotate(x: torch.Tensor, half: bool) -> torch.Tensor:
    """Each channel's rotation partner: interleaved pairs (x0, x1) -> (-x1, x0), or halves (a, b) -> (-b, a)."""
    if half:
        a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat([-b, a], dim=-1)
    out = torch.empty_like(x)
    out[..., 0::2] = -x[..., 1::2]
    out[..., 1::2] = x[..., 0::2]
    return out


def _rope(x: torch.Tensor, emb: torch.Tensor, prefix: int, half: bool) -> torch.Tensor:
    """The rotary embedding of the patch tokens of x (B, H, N, D): x cos + rotate(x) sin, emb = [sin | cos]."""
    sin, cos = emb.double().chunk(2, dim=-1)
    p = x[:, :, prefix:]
    return torch.cat([x[:, :, :prefix], p * cos + _rotate(p, half) * sin], dim=2)


def _qkv(m, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v (B, H, N, D) from one projection; EVA and BEiT bias q and v, never k."""
    bias = m.qkv.bias
    if getattr(m, "q_bias", None) is not None:
        bias = torch.cat([m.q_bias, torch.zeros_like(m.q_bias), m.v_bias])
    return tuple(_split_heads(t, m.num_heads) for t in F.linear(x, m.qkv.weight, bias).chunk(3, dim=-1))


def _vit_attention(ref: Reference, m, x: torch.Tensor, attn_mask=None, is_causal=False) -> torch.Tensor:
    """timm ViT: q and k through their norms; no bias (EVA02's attention without a rotary embedding)."""
    return _eva_attention(ref, m, x, None, attn_mask, is_causal)


def _eva_attention(ref: Reference, m, x: torch.Tensor, rope=None, attn_mask=None, is_causal=False) -> torch.Tensor:
    """EVA02: q and k normed, then rotated by the rotary embedding (patch tokens only)."""
    assert attn_mask is None and not is_causal
    b, n, _ = x.shape
    q, k, v = _qkv(m, x)
    q, k = m.q_norm(q), m.k_norm(k)
    if rope is not None:
        half = getattr(m, "rotate_half", False)
        q, k = _rope(q, rope, m.num_prefix_tokens, half), _rope(k, rope, m.num_prefix_tokens, half)
    ref._q.append(q)
    ref._k.append(k)
    o = m.norm(ref._attend(q, k, v, q.shape[-1] ** -0.5).transpose(1, 2).reshape(b, n, -1))
    if getattr(m, "gate", None) is not None:
        o = o * torch.sigmoid(m.gate(x))
    return m.proj(o)


def _beit_attention(ref: Reference, m, x: torch.Tensor, shared_rel_pos_bias=None) -> torch.Tensor:
    """BEiT: the relative position bias B[h, i, j] = table[index[i, j], h] added to the scaled scores."""
    b, n, _ = x.shape
    q, k, v = _qkv(m, x)
    ref._q.append(q)
    ref._k.append(k)
    bias = torch.zeros(m.num_heads, n, n, dtype=torch.float64)
    if m.relative_position_bias_table is not None:
        table, index = m.relative_position_bias_table, m.relative_position_index
        bias = bias + table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)
    if shared_rel_pos_bias is not None:
        bias = bias + shared_rel_pos_bias.reshape(-1, n, n)
    o = ref._attend(q, k, v, (q.shape[-1]) ** -0.5, bias)
    return m.proj(o.transpose(1, 2).reshape(b, n, -1))


def _map_head(ref: Reference, m, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
    """The MAP head: one learned latent query attends to the tokens; then projection and MLP."""
    assert attn_mask is None and m.latent_len == 1
    b = x.shape[0]
    if m.pos_embed is not None:
        x = x + m.pos_embed[None]
    q = _split_heads(m.q(m.latent.expand(b, -1, -1)), m.num_heads)  # (B, H, 1, D)
    k, v = (_split_heads(t, m.num_heads) for t in m.kv(x).chunk(2, dim=-1))
    q, k = m.q_norm(q), m.k_norm(k)
    o = m.proj(ref._attend(q, k, v, q.shape[-1] ** -0.5, store=ref._pool).transpose(1, 2).reshape(b, 1, -1))
    if m.mlp is not None:
        o = o + m.mlp(m.norm(o))
    return o[:, 0]


ATTENTION = {  # (module, class) of an attention module -> its reference forward
    ("timm.layers.attention", "Attention"): _vit_attention,
    ("timm.models.eva", "EvaAttention"): _eva_attention,
    ("timm.models.beit", "Attention"): _beit_attention,
}


# -- faithfulness: deletion and insertion curves, from the definition ------------------------------
def patch_order(m: np.ndarray, order: str = "most") -> list[int]:
    """Row-major patch indices by the map's value, highest first, ties by lower index; `least` reversed."""
    flat = [float(v) for v in np.asarray(m).ravel()]
    idx = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    return idx[::-1] if order == "least" else idx


def blur_matrix(n: int, sigma: float) -> torch.Tensor:
    """(n, n) float64: row i averages pixels j with weights exp(-(i-j)^2 / 2 sigma^2) for |i - j| <= ceil(4 sigma),
    over the pixels inside the image only, renormalised to sum 1."""
    r = math.ceil(4 * sigma)
    g = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(max(0, i - r), min(n, i + r + 1)):
            g[i, j] = math.exp(-((i - j) ** 2) / (2 * sigma**2))
    return g / g.sum(dim=1, keepdim=True)


def fully_removed(x: torch.Tensor, removal: str, grid: tuple[int, int]) -> torch.Tensor:
    """x (3, H, W) float64 -> every pixel removed: the per-channel mean, or x blurred by sigma = one patch."""
    _, h, w = x.shape
    if removal == "mean":
        return x.mean(dim=(1, 2), keepdim=True).expand_as(x).clone()
    gh_, gw_ = blur_matrix(h, h / grid[0]), blur_matrix(w, w / grid[1])
    return torch.stack([gh_ @ x[c] @ gw_.T for c in range(x.shape[0])])


def patch_pixels(size: tuple[int, int], grid: tuple[int, int], patch: int) -> torch.Tensor:
    """(H, W) bool: the pixels of row-major patch `patch` (pixel (r, c) is in patch (r * gh // H, c * gw // W))."""
    h, w = size
    gh, gw = grid
    pr, pc = divmod(patch, gw)
    rows = torch.tensor([r * gh // h == pr for r in range(h)])
    cols = torch.tensor([c * gw // w == pc for c in range(w)])
    return rows[:, None] & cols[None, :]


@dataclass
class ReferenceCurves:
    deletion: list[float]
    insertion: list[float]
    deletion_auc: float
    insertion_auc: float


def trapezoid(curve: list[float]) -> float:
    k = len(curve) - 1
    return float(sum((curve[s] + curve[s + 1]) / 2 * (1 / k) for s in range(k)))


def faithfulness(ref: Reference, x: torch.Tensor, m: np.ndarray, class_id: int, steps: int = 16,
                 removal: str = "blur", order: str = "most") -> ReferenceCurves:
    """The curves of map m (gh, gw) on the model input x (3, H, W), in float64, one forward per image."""
    x = x.double()
    size, grid = tuple(x.shape[1:]), ref.grid
    p = grid[0] * grid[1]
    ranked = patch_order(m, order)
    gone = fully_removed(x, removal, grid)
    pixels = [patch_pixels(size, grid, i) for i in range(p)]

    images = []  # deletion at s = 0 .. k, then insertion at s = 0 .. k
    for kind in ("deletion", "insertion"):
        for s in range(steps + 1):
            chosen = torch.zeros(size, dtype=torch.bool)
            for i in ranked[: s * p // steps]:
                chosen |= pixels[i]
            images.append(torch.where(chosen, gone, x) if kind == "deletion" else torch.where(chosen, x, gone))
    probs = []
    with torch.no_grad():
        for start in range(0, len(images), 8):  # each image's forward is its own: 8 at a time only for speed
            probs += torch.softmax(ref.model(torch.stack(images[start : start + 8])), -1)[:, class_id].tolist()
    ref._clear()
    deletion, insertion = probs[: steps + 1], probs[steps + 1 :]
    return ReferenceCurves(deletion, insertion, trapezoid(deletion), trapezoid(insertion))


# -- pictures: the heatmap and the per-layer montage, from the definition --------------------------
def jet(m: np.ndarray) -> np.ndarray:
    """(...) values in [0, 1] -> (..., 3) float64 RGB in [0, 1]: the cmap library's 256-entry jet table
    at entry floor(255 m)."""
    from cmap import Colormap

    table = Colormap("jet").lut(256)[:, :3].astype(np.float64)
    return table[np.floor(np.clip(m, 0.0, 1.0) * 255.0).astype(np.int64)]


def heatmap(img: Image.Image, mask: np.ndarray) -> np.ndarray:
    """The overlay of a (gh, gw) mask on img -> (H, W, 3) float64 in [0, 255]: the mask upsampled to
    the image's size bilinearly (half-pixel centres), clipped to [0, 1], coloured in jet, plus the
    image / 255; the sum divided by its maximum over the whole picture, x 255."""
    w, h = img.size
    m = torch.from_numpy(np.asarray(mask, np.float64))[None, None]
    up = torch.nn.functional.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    cam = jet(up) + np.asarray(img.convert("RGB"), np.float64) / 255.0
    return cam / cam.max() * 255.0


def montage(tile_img: Image.Image, maps: np.ndarray, gap: int = 4) -> np.ndarray:
    """The per-layer picture: one heatmap of tile_img (the upload shrunk to fit a tile) per map (L, gh, gw),
    row-major in a grid of ceil(sqrt(L)) columns and as many rows as needed, `gap` white pixels between
    tiles -> (rows * th + (rows - 1) * gap, cols * tw + (cols - 1) * gap, 3) float64; unused cells white."""
    tw, th = tile_img.size
    cols = math.ceil(math.sqrt(len(maps)))
    rows = math.ceil(len(maps) / cols)
    sheet = np.full((rows * th + (rows - 1) * gap, cols * tw + (cols - 1) * gap, 3), 255.0)
    for i, m in enumerate(maps):
        r, c = divmod(i, cols)
        sheet[r * (th + gap) : r * (th + gap) + th, c * (tw + gap) : c * (tw + gap) + tw] = heatmap(tile_img, m)
    return sheet


# -- transformers classifiers (service/hf_models.py), from the definition -------------------------
_HF_REFERENCE = "vit_explain_reference"
_HF_RECORD: list = []  # the running HFReference's stores, innermost last


def _hf_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """softmax(q k^T * scaling + mask) in the inputs' dtype (float64 here; transformers' eager attention would
    take its softmax in float32), recorded where the model applies it, then times v."""
    scores = (query @ key.transpose(-2, -1)) * scaling
    if attention_mask is not None:  # BEiT: the relative position bias
        scores = scores + attention_mask
    attn = scores.softmax(dim=-1)
    if _HF_RECORD:
        store = _HF_RECORD[-1]
        store["attn"].append(attn)
        store["q"].append(query)
        store["k"].append(key)
    return (attn @ value).transpose(1, 2), None


class HFReference(Reference):
    """The float64 maps of a transformers classifier (an HFClassifier: `.hf`, `.input_config`, logits out).

    The explained row: the class token's row where the head reads the class token (ViT, DeiT, DINOv2),
    the mean of the patch tokens' rows, class token excluded, where it pools them (BEiT's mean pooling).
    Per-layer attention of a pooled model: per head, the mean of the patch rows. Prefix tokens are the
    tokens before the gh x gw patches, gh, gw = input size / patch size."""

    def __init__(self, model: torch.nn.Module) -> None:
        from transformers import AttentionInterface

        AttentionInterface.register(_HF_REFERENCE, _hf_reference_attention)
        self.model = copy.deepcopy(model).double().eval()
        self.model.hf.set_attn_implementation(_HF_REFERENCE)
        cfg = self.model.hf.config
        p = cfg.patch_size
        h, w = self.model.input_config["size"]
        self.grid = (h // p, w // p)
        # what the head reads (the maps are the shared Reference's, from this explained row)
        self.pooling = "avg" if cfg.model_type == "beit" and cfg.use_mean_pooling else "token"
        self.skip = 0
        self._store = {"attn": [], "q": [], "k": []}
        self._attn, self._q, self._k = self._store["attn"], self._store["q"], self._store["k"]
        self._pool: list[torch.Tensor] = []  # no attention-pooling head
        with torch.no_grad(), self._recording():
            self.model(torch.zeros(1, 3, h, w, dtype=torch.float64))
        self.prefix = self._attn[0].shape[-1] - self.grid[0] * self.grid[1]
        base = self.model.hf.base_model
        self.blocks = getattr(base, "layers", None) or getattr(base.encoder, "layers", None) or base.encoder.layer

    def _recording(self):
        import contextlib

        @contextlib.contextmanager
        def rec():
            for s in self._store.values():
                s.clear()
            _HF_RECORD.append(self._store)
            try:
                yield
            finally:
                _HF_RECORD.pop()

        return rec()

    def run(self, x: torch.Tensor, category: int | None = None) -> Captured:
        with self._recording():
            self.model.requires_grad_(category is not None)
            with torch.set_grad_enabled(category is not None):
                logits = self.model(x[None].double())[0]
            attn = list(self._attn)
            grads = None
            if category is not None:
                grads = [g[0] for g in torch.autograd.grad(logits[category], attn)]
            return Captured(logits=logits.detach(), attn=[a.detach()[0] for a in attn],
                            q=[q.detach()[0] for q in self._q], k=[k.detach()[0] for k in self._k], grads=grads)

    def unit(self, x: torch.Tensor, target: str, category_id: int = 0, layer: int = 0, head: int = 0,
             channel: int = 0) -> tuple[float, torch.Tensor]:
        cfg = self.model.input_config
        mean = torch.tensor(cfg["mean"], dtype=torch.float64)[:, None, None]
        std = torch.tensor(cfg["std"], dtype=torch.float64)[:, None, None]
        px = x.double().clone().requires_grad_(True)
        out = {}
        hook = self.blocks[layer].register_forward_hook(lambda m, i, o: out.setdefault("features", o))
        try:
            with self._recording(), torch.enable_grad():
                logits = self.model(((px - mean) / std)[None])[0]
                if target == "class":
                    value = logits[category_id]
                elif target == "features":
                    value = out["features"][0, self.prefix :, channel].mean()
                else:
                    t = (self._q if target == "q" else self._k)[layer][0]  # (H, N, D)
                    value = t[head, self.prefix :, channel].mean()
                (grad,) = torch.autograd.grad(value, px)
        finally:
            hook.remove()
        return float(value.detach()), grad
