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


class Faithfulness(_Out):
    """Deletion and insertion curves of one map (README "Faithfulness")."""

    class_id: int  # the explained class: category_id where the method has one, else the top prediction
    steps: int  # k
    removal: Literal["blur", "mean"]
    order: Literal["most", "least"]
    deletion: list[float]  # k + 1 probabilities of the class, s = 0 .. k patches-steps removed
    insertion: list[float]  # k + 1 probabilities, s = 0 .. k steps put back on the removed image
    deletion_auc: float  # trapezoid rule over s / k: lower is more faithful (order most)
    insertion_auc: float  # higher is more faithful (order most)


class MaskResponse(_Out):
    model: str
    method: str  # the method's name: one declared comparable (GET /methods)
    params: dict[str, Any]
    grid: tuple[int, int]
    mask: Map
    predictions: list[Prediction]
    faithfulness: Faithfulness | None = None  # present when asked


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


class SweepResponse(_Out):
    model: str
    method: str  # the name of the method swept
    params: dict[str, Any]
    grid: tuple[int, int]
    discard_ratios: list[float]
    masks: list[Map]  # one per ratio, in order
    predictions: list[Prediction]
    faithfulness: list[Faithfulness] | None = None  # one per ratio, when asked


class LongResponse(_Out):
    """The JSON answer of every long-work method (GET /methods' kind "long"): its picture and its
    objective at every step. The command line and the explorer page show the picture from it."""

    model: str
    params: dict[str, Any]
    image: str  # base64 PNG at the model's input size
    objective: list[float | None]  # the objective at every step, before that step's update (null: not finite)


class ActivationMaxResponse(LongResponse):
    """objective: the unit's value. robustness: (mean objective of the picture under 16 held-out
    random transforms - start_objective) / (final_objective - start_objective), null when the ascent
    gained nothing or was stopped; final_objective: the finished picture's objective;
    start_objective: the starting picture's."""

    robustness: float | None = None
    final_objective: float | None = None
    start_objective: float | None = None


class ParamInfo(_Out):
    name: str
    type: str
    required: bool
    default: Any = None
    enum: list[Any] | None = None
    minimum: float | None = None
    exclusive_minimum: float | None = None
    maximum: float | None = None
    exclusive_maximum: float | None = None
    below: str | None = None  # index below this dimension of the chosen model (GET /models)
    when: dict[str, list[Any]] | None = None  # applies only when these other parameters have one of these values
    role: str | None = None  # what a client may do with it without knowing its name (schemas.requests.ROLES)
    description: str = ""


class MethodInfo(_Out):
    name: str
    path: str
    summary: str
    # one-pass: a map from one pass, answered when done; long: many steps, whose progress streams as
    # server-sent events with `Accept: text/event-stream` (docs/methods.md)
    kind: Literal["one-pass", "long"]
    image: Literal["required", "optional"]
    max_images: int  # images one request may carry (several are answered as JSON, one result each)
    faithful: bool  # takes the faithfulness options: its maps can be scored (docs/faithfulness.md)
    comparable: bool  # answers one map: a setting of POST /compare
    formats: list[str]
    params: list[ParamInfo]


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
    source: str | None = None  # where the model comes from: timm, transformers
    family: str | None = None  # its architecture, e.g. VisionTransformer, Eva, Beit
    pooling: Literal["token", "avg", "map"] | None = None  # what its classifier reads: the explained row
    layers: int | None = None
    heads: int | None = None
    head_dim: int | None = None
    embed_dim: int | None = None
    default: bool = False


class Error(_Out):
    detail: Any


class MultiResponse(_Out):
    """Several images in one request: one result per image, in order."""

    model: str
    results: list[dict[str, Any]]
