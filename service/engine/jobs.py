"""What one image in a batch asks the engine for, and what it gets back.

A job is a method (service/methods/) and its validated parameters. The engine knows methods only
through what they declare (`needs`, `compute`), so it never changes when a method is added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from service.engine.faithfulness import Curves
    from service.methods.base import Method


@dataclass(frozen=True)
class Job:
    method: "Method"
    params: Any  # the method's frozen Params

    @property
    def key(self) -> tuple:
        """Jobs with equal keys are computed together, in one call of the method's `compute`."""
        return (self.method.name, self.method.group_key(self.params))


@dataclass(frozen=True)
class Prediction:
    class_id: int
    score: float  # softmax probability


@dataclass(frozen=True)
class Result:
    """maps: what the method computed for this image (None for predict); the model's top classes;
    for iterative methods, the objective at every step; the faithfulness scores of its maps."""

    maps: np.ndarray | None
    predictions: list[Prediction]
    objective: list[float] | None = None
    faithfulness: list[Curves] | None = None  # one per map (frame), when the job asked
