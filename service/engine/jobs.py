"""What one image in a batch asks the engine for, and what it gets back.

These are the engine's own types, independent of HTTP: the routes translate validated request
schemas into jobs, the engine answers with results, the routes encode results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

import numpy as np

from service.engine.methods import Fusion


@dataclass(frozen=True)
class Rollout:
    head_fusion: Fusion = "max"
    discard_ratio: float = 0.9


@dataclass(frozen=True)
class GradRollout:
    category_id: int
    head_fusion: Fusion = "mean"
    discard_ratio: float = 0.9


@dataclass(frozen=True)
class LayerAttention:
    head: int | Fusion = 0


@dataclass(frozen=True)
class QK:
    layer: int
    head: int
    channel: int
    which: Literal["q", "k"] = "q"


@dataclass(frozen=True)
class Predict:
    pass


Job = Union[Rollout, GradRollout, LayerAttention, QK, Predict]


@dataclass(frozen=True)
class Prediction:
    class_id: int
    score: float  # softmax probability


@dataclass(frozen=True)
class Result:
    """maps: (gh, gw) for rollout, grad rollout and qk; (L, gh, gw) for layer attention; None for predict."""

    maps: np.ndarray | None
    predictions: list[Prediction]
