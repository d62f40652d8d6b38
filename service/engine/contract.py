"""The contract between the engine and the methods: the one module both import.

The engine (service/engine/engine.py) knows a method only through what this module declares:

    ModelShape   what a method may know about the model it runs on
    Needs        what one job asks of the forward pass (autograd or plain, reductions, q/k, outputs)
    FuseHeads, ExplainedRow, WholeAttention
                 the reductions of a block's attention the plain pass can keep (`Needs.reduce`)
    Captured     what a pass captured, cut to the rows of one group of jobs
    Job          one image's method and its validated parameters
    Prediction, Result
                 what the engine answers for each image

and the two kinds of method it runs, as protocols (the methods' bases in service/methods/base.py
implement them): `OnePass`, a map from one pass (`Engine.run`), and `Stepwise`, long work that
takes one batched step at a time (`Engine.step`). Nothing here imports service/methods/.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch

from schemas.requests import Fusion
from service.engine import ops
from service.engine.faithfulness import Stop

if TYPE_CHECKING:
    from service.engine.faithfulness import Ask, Curves


@dataclass(frozen=True)
class ModelShape:
    """What a method may know about the model it runs on."""

    name: str
    grid: tuple[int, int]  # (gh, gw) patches
    prefix: int  # P tokens before the patches: class token first, then distillation/register tokens
    layers: int
    heads: int
    head_dim: int
    embed_dim: int
    input_size: tuple[int, int]  # (H, W) the model takes
    labels: tuple[str, ...] = ()
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # the model's input normalisation
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    mlp_dim: int = 0  # hidden units of a block's MLP (its first layer's outputs; 0: no such layer)
    # what the classifier reads, which sets the explained row (docs/how-it-works.md): "token" the class
    # token (row 0); "avg" the mean of the patch tokens (rows P:); "map" an attention-pooling head, captured
    # as block `layers` (one more layer, a single row over the tokens pool_skip..)
    pooling: str = "token"
    pool_skip: int = 0

    @property
    def pool(self) -> frozenset[int]:
        """The pooling head's block index ({layers}) when the model has one, else nothing."""
        return frozenset({self.layers}) if self.pooling == "map" else frozenset()

    def explained(self, start: int = 0) -> frozenset[int]:
        """The blocks start .. L-1 whose attention a rollout needs, and the pooling head whatever start is."""
        return frozenset(range(start, self.layers)) | self.pool

    def row(self, like: torch.Tensor, n: int, pool: torch.Tensor | None = None) -> torch.Tensor:
        """The explained row (B, N) over the tokens (ops.explained); pool: the pooling head's row (B, N - skip)
        as the method weighs it, when the model has one."""
        return ops.explained(self.pooling, self.prefix, n, like, pool, self.pool_skip)

    def tokens(self, row: torch.Tensor, n: int) -> torch.Tensor:
        """A pooling head's row (..., N - skip) placed over all N tokens (zero on those it skips)."""
        out = row.new_zeros(*row.shape[:-1], n)
        out[..., self.pool_skip :] = row
        return out

    @property
    def classes(self) -> int:
        return len(self.labels)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) pixel values in [0, 1] -> the model's input: (x - mean) / std."""
        mean = torch.tensor(self.mean, device=pixels.device, dtype=pixels.dtype)[:, None, None]
        std = torch.tensor(self.std, device=pixels.device, dtype=pixels.dtype)[:, None, None]
        return (pixels - mean) / std


# -- what a job needs from the pass -------------------------------------------------------------
@dataclass(frozen=True)
class FuseHeads:
    """Keep fuse(A_l) (N, N) per image: the heads fused as soon as the attention is made."""

    fusion: Fusion
    buffer: ClassVar[str] = "fused"

    @staticmethod
    def shape(heads: int, rows: int, n: int) -> tuple[int, ...]:
        return (rows, n)

    def __call__(self, a: torch.Tensor, out: torch.Tensor) -> None:
        ops.fuse_heads(a, self.fusion, out=out)  # a (b, H, Nq, N) -> out (b, Nq, N)


@dataclass(frozen=True)
class ExplainedRow:
    """Keep the explained row of A_l (H, N) per image: the class token's row A_l[:, 0, :] (patches_from
    None), or the mean of the patch tokens' rows A_l[:, P:, :] (patches_from P). An attention with a
    single row (a pooling head's) keeps that row."""

    patches_from: int | None = None
    buffer: ClassVar[str] = "row"

    @staticmethod
    def shape(heads: int, rows: int, n: int) -> tuple[int, ...]:
        return (heads, n)

    def __call__(self, a: torch.Tensor, out: torch.Tensor) -> None:
        if self.patches_from is None or a.shape[2] == 1:
            out.copy_(a[:, :, 0])
        else:
            torch.mean(a[:, :, self.patches_from :], dim=2, out=out)


@dataclass(frozen=True)
class WholeAttention:
    """Keep A_l (H, Nq, N) per image, whole: for computing several methods' maps from one pass (POST /compare)."""

    buffer: ClassVar[str] = "whole"

    @staticmethod
    def shape(heads: int, rows: int, n: int) -> tuple[int, ...]:
        return (heads, rows, n)

    def __call__(self, a: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(a)


Reduction = FuseHeads | ExplainedRow | WholeAttention


@dataclass(frozen=True)
class Needs:
    """What one job needs from the forward pass.

    grad_class  the autograd pass: every block's whole attention and its gradient with respect to
                the logit of this class (None: the plain pass)
    reduce      the plain pass: the attention of `layers` reduced as it is made (never kept whole)
    qk          q and k (after the q/k norm) of these blocks
    features    the output (B, N, C) of these blocks
    mlp         the MLP hidden units before the activation (B, N, hidden) of these blocks
    """

    grad_class: int | None = None
    reduce: Reduction | None = None
    layers: frozenset[int] = frozenset()
    qk: frozenset[int] = frozenset()
    features: frozenset[int] = frozenset()
    mlp: frozenset[int] = frozenset()


@dataclass
class Captured:
    """What a pass captured, for the rows of one group of jobs. Per block lists are in block order.

    reduced  block -> (b, ...) the `reduce` of the group (plain pass)
    attn     per block (b, H, N, N) post-softmax, float32, and grads dy_c/dA (autograd pass); a pooling
             head's (b, H, 1, N') last, at index `layers`
    q, k     block -> (b, H, N, D)
    features block -> (b, N, C)
    mlp      block -> (b, N, hidden) the MLP's first layer's output (before its activation)
    """

    logits: torch.Tensor  # (b, classes)
    reduced: dict[int, torch.Tensor] = field(default_factory=dict)
    attn: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    q: dict[int, torch.Tensor] = field(default_factory=dict)
    k: dict[int, torch.Tensor] = field(default_factory=dict)
    features: dict[int, torch.Tensor] = field(default_factory=dict)
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)


# -- what the engine answers ---------------------------------------------------------------------
@dataclass(frozen=True)
class Prediction:
    class_id: int
    score: float  # softmax probability


@dataclass(frozen=True)
class Result:
    """maps: what the method computed for this image (None for predict; the picture for long work);
    the model's top classes; for long work, the objective at every step and its own figures; the
    faithfulness scores of its maps, one per map (frame), when the job asked."""

    maps: np.ndarray | None
    predictions: list[Prediction]
    objective: list[float] | None = None
    faithfulness: list[Curves] | None = None
    extra: dict[str, Any] | None = None  # long work: figures of its own for its answer (e.g. robustness)


# -- the two kinds of method the engine runs ------------------------------------------------------
class OnePass(Protocol):
    """A map from one pass (`Engine.run`)."""

    name: str
    kind: str  # "one-pass"

    def needs(self, p: Any, shape: ModelShape) -> Needs: ...

    def group_key(self, p: Any) -> Hashable:
        """Jobs with equal keys are computed together, in one call of `compute`."""

    def compute(self, p: Any, c: Captured, shape: ModelShape) -> torch.Tensor | None:
        """The maps (b, ...) of a group of images, from what the pass captured, or None."""

    def faithfulness(self, p: Any, r: Result, shape: ModelShape) -> Ask | None:
        """What to score of this image's result after the pass (None: nothing)."""


class Stepwise(Protocol):
    """Long work, one batched step at a time (`Engine.step`): each image has its own state."""

    name: str
    kind: str  # "long"

    def needs(self, p: Any, shape: ModelShape) -> Needs: ...

    def group_key(self, p: Any) -> Hashable: ...

    def shifted(self, p: Any, state: Any) -> torch.Tensor:
        """This step's input, pixel values in [0, 1] at the model's input size: one picture (3, H, W)
        or c copies (c, 3, H, W), each a row of the batch."""

    def objective(self, p: Any, c: Captured, x: torch.Tensor, shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (the value (b,), the penalty (b,)) of a group of equal parameters; the step ascends value - penalty."""

    def update(self, p: Any, state: Any, grad: torch.Tensor, value: Any) -> float | None:
        """Take the step from the gradient of value - penalty at `shifted`'s input: (3, H, W) and
        value a float when it made one picture, (c, 3, H, W) and value a list of c floats when it made
        c copies. -> the value to report for the step (None: value, or the copies' mean)."""


# Stop (service/engine/faithfulness.py, the first unit of work that checks it): the error a job's work
# stops with now (its request ran past its deadline: TimeoutError; its client left or was answered), else
# None: a cheap check (a flag and a clock read) the engine makes between units of work, such as the chunks
# of faithfulness copies (service/budget.py stop_signal makes them); the error is the job's answer.


@dataclass(frozen=True)
class Job:
    """One image's method and its validated (frozen) parameters, and its request's stop signal."""

    method: OnePass | Stepwise
    params: Any
    stop: Stop | None = field(default=None, compare=False, repr=False)

    def stopped(self) -> BaseException | None:
        return None if self.stop is None else self.stop()

    @property
    def key(self) -> tuple:
        """Jobs with equal keys are computed together, in one call of the method's `compute`."""
        return (self.method.name, self.method.group_key(self.params))
