"""Response bodies: the JSON each endpoint answers with."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Map = list[list[float]]  # gh rows of gw floats


class _Out(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class Prediction(_Out):
    class_id: int
    label: str
    score: float  # softmax probability


class MaskResponse(_Out):
    model: str
    method: Literal["rollout", "grad-rollout"]
    params: dict[str, Any]
    grid: tuple[int, int]
    mask: Map
    predictions: list[Prediction]


class AttentionResponse(_Out):
    model: str
    params: dict[str, Any]
    grid: tuple[int, int]
    layers: list[Map]


class QKResponse(_Out):
    model: str
    params: dict[str, Any]
    grid: tuple[int, int]
    map: Map


class PredictResponse(_Out):
    model: str
    predictions: list[Prediction]


class ModelInfo(_Out):
    name: str
    spec: str
    status: Literal["loading", "ready", "unavailable"]
    reason: str | None = None
    device: str
    replicas: int = 0
    grid: tuple[int, int] | None = None
    classes: int | None = None
    prefix_tokens: int | None = None
    layers: int | None = None
    heads: int | None = None
    head_dim: int | None = None
    default: bool = False


class Error(_Out):
    detail: Any


class MultiResponse(_Out):
    """Several images in one request: one result per image, in order."""

    model: str
    results: list[dict[str, Any]]
