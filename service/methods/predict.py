"""The model's top-5 classes: a forward pass and nothing captured."""

from __future__ import annotations

from typing import Any

from schemas import requests as rq
from schemas import responses as rs
from service.engine.jobs import Result
from service.methods.base import Method, ModelShape, predictions, register


class PredictParams(rq.Params):
    pass


@register
class Predict(Method):
    name = "predict"
    summary = "Top-5 classes"
    Params = PredictParams
    Response = rs.PredictResponse

    def to_json(self, p: PredictParams, r: Result, shape: ModelShape) -> dict[str, Any]:
        return {"model": shape.name, "predictions": predictions(r, shape)}
