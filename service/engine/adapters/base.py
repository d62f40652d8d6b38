"""The one table of attention implementations the engine can capture, and the anatomy of a model: what an
adapter and an anatomy are, and the table itself. The sources fill it (timm_models.py, transformers_models.py,
imported by the package), each importing from here and never from the package, so nothing imports in a circle.

Nothing outside this package knows a model family by name: the engine reads a model through its
`Anatomy` (what `describe(model)` answers) and captures each attention module through its `Adapter`.

An attention module computes, per head, o = softmax(q k^T * scale + bias) v. An adapter says how one
implementation gets there, in two halves that the capture (service/engine/capture.py) puts around its
own explicit softmax:

    split(module, *args, **kwargs) -> QKV(q, k, v, bias, scale)
        the module's forward up to the attention product: q (B, H, Nq, D) and k (B, H, N, D) exactly as
        they enter q k^T (after any q/k norm and rotary embedding, before the scale), v (B, H, N, Dv),
        and `bias`, whatever the module adds to the scaled scores before the softmax (a relative
        position bias (1|B, H, Nq, N), an additive float or boolean mask), or None. scale None: D ** -0.5.
    merge(module, o, *args, **kwargs) -> the module's output
        the rest of its forward, from o = a @ v (B, H, Nq, Dv).

The attention the engine explains is a = softmax(q k^T * scale + bias): the tensor that multiplies v.
While nothing is captured the module runs its own forward, untouched (its fused kernel included).

How a source (timm, transformers, ...) plugs in
-----------------------------------------------
1. Register one adapter per attention class it uses:

       register_adapter(Adapter(name="timm.Attention", kind=timm.layers.Attention, split=..., merge=...,
                                refuse=lambda m: None))

   `kind` is matched by exact type (a subclass with a different forward needs its own adapter);
   `refuse(module)` returns a reason when this instance cannot be captured (e.g. dropout in eval,
   grouped-query heads), else None.
2. Register a describer:

       register_source("timm", describe_timm)

   describe_timm(model) -> Anatomy | None: None when the model is not this source's (the next source is
   asked); raises UnsupportedModel(reason) when it is but cannot be explained. `attention_of(module)`
   returns a module's adapter or raises UnsupportedModel naming its class. A source module imports
   its optional dependency (transformers) only inside its functions, and the package
   (service/engine/adapters/__init__.py) imports every source module, so registering is one import line there.
3. Fill an `Anatomy` (below): blocks, each block's attention module, the pooling head, grid, prefix,
   pooling, input size, mean/std, labels, dims and `forward` (pixels -> logits (B, classes)).

The explained row (docs/how-it-works.md): pooling "token" -> the class token's row (token 0);
"avg" -> the mean of the patch tokens' rows; "map" -> the pooling head's attention row, whose keys
are the tokens from `pool_skip` on, as one more layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn

Pooling = Literal["token", "avg", "map"]


class UnsupportedModel(ValueError):
    """The model cannot be explained: the reason says what it lacks (a known attention, a known pooling)."""


class QKV(NamedTuple):
    q: torch.Tensor  # (B, H, Nq, D) as it enters q k^T (after q norm and rotary embedding)
    k: torch.Tensor  # (B, H, N, D)
    v: torch.Tensor  # (B, H, N, Dv)
    bias: torch.Tensor | None = None  # added to the scaled scores (float), or True where allowed (bool)
    scale: float | None = None  # None: D ** -0.5


@dataclass(frozen=True)
class Adapter:
    """How one attention implementation reaches its attention product, and finishes after it."""

    name: str
    kind: type[nn.Module]
    split: Callable[..., QKV] | None = None
    merge: Callable[..., torch.Tensor] | None = None
    refuse: Callable[[nn.Module], str | None] = lambda m: None
    # Instead of split/merge: an implementation whose module hands q, k, v to a function the service owns
    # (transformers' AttentionInterface) keeps its own forward; `bind(module, block)` tells it its block index
    # once, and that function calls `capture.attend` (service/engine/adapters/transformers_models.py).
    bind: Callable[[nn.Module, int], None] | None = None


@dataclass(frozen=True)
class Anatomy:
    """What the engine knows of a model: read once, when it is loaded."""

    source: str  # "timm", "transformers"
    family: str  # e.g. the model's class name
    blocks: Sequence[nn.Module]  # the transformer blocks, in order (their outputs: activation maximization)
    attentions: Sequence[nn.Module]  # the attention module of each block
    pool: nn.Module | None  # the attention-pooling head (pooling "map"), else None
    grid: tuple[int, int]  # (gh, gw) patches, from the patch embedding
    prefix: int  # tokens before the patches (class, distillation, register tokens)
    pooling: Pooling
    input_size: tuple[int, int]  # (H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...]
    heads: int
    head_dim: int
    embed_dim: int
    forward: Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) normalised input -> logits (B, classes)
    interpolation: str = "bicubic"  # the resize to the input size
    pool_skip: int = 0  # the pooling head's keys are tokens pool_skip.. (it skips the prefix tokens)

    @property
    def layers(self) -> int:
        return len(self.attentions)

    def adapter(self, module: nn.Module) -> Adapter:
        return attention_of(module)


ADAPTERS: dict[type[nn.Module], Adapter] = {}
SOURCES: dict[str, Callable[[nn.Module], Anatomy | None]] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    ADAPTERS[adapter.kind] = adapter
    return adapter


def register_source(name: str, describe_fn: Callable[[nn.Module], Anatomy | None]) -> None:
    SOURCES[name] = describe_fn


def attention_of(module: nn.Module) -> Adapter:
    """The adapter of this attention module, or UnsupportedModel saying why it cannot be captured."""
    adapter = ADAPTERS.get(type(module))
    if adapter is None:
        known = ", ".join(sorted(a.name for a in ADAPTERS.values()))
        raise UnsupportedModel(f"attention {type(module).__module__}.{type(module).__name__} has no adapter "
                               f"(known: {known})")
    why = adapter.refuse(module)
    if why:
        raise UnsupportedModel(f"{adapter.name}: {why}")
    return adapter


def describe(model: nn.Module) -> Anatomy:
    """The model's anatomy from the first source that knows it, or UnsupportedModel saying why not."""
    for describe_fn in SOURCES.values():
        anatomy = describe_fn(model)
        if anatomy is not None:
            return anatomy
    raise UnsupportedModel(f"{type(model).__module__}.{type(model).__name__} is from no known source "
                           f"({', '.join(SOURCES)})")
