"""The model families the tests prove, as small random-weight timm models, and the methods proven on each.

`python -m tests.families` prints the coverage table of docs/models.md; tests/test_families.py checks that
the table there is this one, and that every (family, method) in it is compared with the float64 reference.
"""

from __future__ import annotations

import timm
import torch

# family id -> (what it is, timm name, its arguments beside depth=2, num_classes=10, img_size=96)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "vit": ("ViT, class token", "vit_tiny_patch16_224", {}),
    "deit-distilled": ("DeiT with distillation token", "deit_tiny_distilled_patch16_224", {}),
    "deit3": ("DeiT III (layer scale)", "deit3_small_patch16_224", {"embed_dim": 96, "num_heads": 3}),
    "vit-reg": ("ViT with 2 register tokens", "vit_tiny_patch16_224", {"reg_tokens": 2}),
    "vit-avg": ("ViT, no class token, `global_pool='avg'`", "vit_tiny_patch16_224",
                {"class_token": False, "global_pool": "avg"}),
    "vit-map": ("ViT, no class token, MAP head (`global_pool='map'`)", "vit_tiny_patch16_224",
                {"class_token": False, "global_pool": "map"}),
    "vit-map-reg": ("ViT, class + 2 register tokens, MAP head over the patches", "vit_tiny_patch16_224",
                    {"reg_tokens": 2, "global_pool": "map"}),
    "eva02": ("EVA02 (rotary embedding, `EvaAttention`)", "eva02_tiny_patch14_224", {"img_size": 98}),
    "beit": ("BEiT (relative position bias, patch mean)", "beit_base_patch16_224", {"embed_dim": 96, "num_heads": 3}),
    "beit-shared": ("BEiT with one shared relative position bias", "beit_base_patch16_224",
                    {"embed_dim": 96, "num_heads": 3, "use_rel_pos_bias": False, "use_shared_rel_pos_bias": True}),
}

# the methods tests/test_families.py compares with the reference on every family
METHODS = ("rollout", "grad-rollout", "gae", "attention", "qk", "rollout-sweep", "grad-rollout-sweep", "compare",
           "predict")


def make(family: str, seed: int = 0) -> torch.nn.Module:
    """A small random-weight model of the family, its attention sharpened so that maps are far from uniform:
    q/k projections x4 and relative position biases of unit size (timm initialises them near zero)."""
    _, name, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False, **{"depth": 2, "num_classes": 10, "img_size": 96, **kwargs}).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(("attn.qkv.weight", "attn_pool.q.weight", "attn_pool.kv.weight", "attn_pool.latent")):
                p.mul_(4.0)
            elif "relative_position_bias_table" in n:
                p.normal_(0.0, 1.0)
    return m


def table() -> str:
    """The coverage table (markdown): every family, every method, each cell proven by tests/test_families.py."""
    head = "| family | timm model (tested small) | " + " | ".join(f"`{m}`" for m in METHODS) + " |"
    rule = "|---|---|" + "---|" * len(METHODS)
    rows = [f"| {what} | `{name}` | " + " | ".join("yes" for _ in METHODS) + " |"
            for what, name, _ in FAMILIES.values()]
    return "\n".join([head, rule, *rows])


if __name__ == "__main__":
    print(table())
