"""The model's top-5 classes: a forward pass and nothing captured."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from schemas import requests as rq
from schemas import responses as rs
from service.engine.contract import ModelShape, Result
from service.methods.base import OnePassMethod, predictions
from service.methods.registry import register


class PredictParams(rq.Params):
    format: Literal["json"] = Field("json", description="json: the top-5 classes (the only format)")


@register
class Predict(OnePassMethod):
    name = "predict"
    summary = "Top-5 classes"
    Params = PredictParams
    faithful = False
    comparable = False
    Response = rs.PredictResponse

    def to_json(self, p: PredictParams, r: Result, shape: ModelShape) -> dict[str, Any]:
        return {"model": shape.name, "predictions": predictions(r, shape)}
