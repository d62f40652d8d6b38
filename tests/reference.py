"""An independent, dense float64 reference for every map the service returns.

Written from the definitions in docs/how-it-works.md, not from the engine: a float64 copy of the model
with timm's *unfused* attention path, the post-softmax attention read where the model applies
it (the output of `attn_drop`), gradients by autograd on those very tensors, full N x N matrix
products, and a full stable sort for the discard. Slow and simple on purpose.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
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
    q: list[torch.Tensor]  # per layer (H, N, D), after q_norm, before scaling
    k: list[torch.Tensor]
    grads: list[torch.Tensor] | None = None  # per layer d logit_c / d attn, (H, N, N)


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
        self.prefix = self.model.num_prefix_tokens
        self.grid = tuple(self.model.patch_embed.grid_size)
        self._attn: list[torch.Tensor] = []
        self._q: list[torch.Tensor] = []
        self._k: list[torch.Tensor] = []
        for blk in self.model.blocks:
            blk.attn.fused_attn = False  # this private copy only
            blk.attn.attn_drop.register_forward_hook(lambda m, i, o: self._attn.append(o))
            blk.attn.q_norm.register_forward_hook(lambda m, i, o: self._q.append(o))
            blk.attn.k_norm.register_forward_hook(lambda m, i, o: self._k.append(o))

    def run(self, x: torch.Tensor, category: int | None = None) -> Captured:
        """x (3, H, W). With a category, also the gradient of its logit w.r.t. every attention."""
        for store in (self._attn, self._q, self._k):
            store.clear()
        self.model.requires_grad_(category is not None)
        with torch.set_grad_enabled(category is not None):
            logits = self.model(x[None].double())[0]
        attn = list(self._attn)
        grads = None
        if category is not None:
            for a in attn:
                a.retain_grad()
            logits[category].backward()
            grads = [a.grad[0] for a in attn]
            self.model.zero_grad(set_to_none=True)
        return Captured(
            logits=logits.detach(),
            attn=[a.detach()[0] for a in attn],
            q=[q.detach()[0] for q in self._q],
            k=[k.detach()[0] for k in self._k],
            grads=grads,
        )

    # -- the maps, from the definitions --------------------------------------------------------
    def _rollout(self, weights: list[torch.Tensor], start_layer: int = 0) -> np.ndarray:
        n = weights[0].shape[0]
        eye = torch.eye(n, dtype=torch.float64)
        r = eye.clone()
        for w in weights[start_layer:]:
            a = w + eye
            a = a / a.sum(dim=-1, keepdim=True)  # rows sum to 1
            r = a @ r  # R = Â_l ... Â_s
        return self._mask(r[0])

    def _mask(self, row: torch.Tensor) -> np.ndarray:
        m = row[self.prefix :].reshape(self.grid)
        return (m / m.max() if m.max() > 0 else m).numpy()

    def rollout(self, c: Captured, fusion: str = "max", ratio: float = 0.9, start_layer: int = 0) -> np.ndarray:
        return self._rollout([discard(fuse(a, fusion), ratio) for a in c.attn], start_layer)

    def grad_rollout(self, c: Captured, fusion: str = "mean", ratio: float = 0.9, start_layer: int = 0) -> np.ndarray:
        assert c.grads is not None
        weights = [discard(fuse(a * g, fusion).clamp(min=0), ratio) for a, g in zip(c.attn, c.grads)]
        return self._rollout(weights, start_layer)

    def gae(self, c: Captured, start_layer: int = 0) -> np.ndarray:
        """Chefer et al. 2021: R = I; for each block in order R = R + mean_h(max(dA * A, 0)) R."""
        assert c.grads is not None
        n = c.attn[0].shape[-1]
        r = torch.eye(n, dtype=torch.float64)
        for a, g in list(zip(c.attn, c.grads))[start_layer:]:
            abar = (g * a).clamp(min=0).mean(0)
            r = r + abar @ r
        return self._mask(r[0])

    def attention(self, c: Captured, head) -> np.ndarray:
        maps = []
        for a in c.attn:
            row = a[head, 0] if isinstance(head, int) else fuse(a[:, 0], head)
            m = row[self.prefix :].reshape(self.grid)
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
            for store in (self._attn, self._q, self._k):
                store.clear()
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
    for store in (ref._attn, ref._q, ref._k):
        store.clear()
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
