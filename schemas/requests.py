"""Request parameters: the fields each endpoint accepts besides the image.

They come as form fields of a multipart/form-data request (with one or more `image` file
parts), or as members of an application/json object (with `image` as a base64 string or a list
of them). Every field is validated with its range here; ranges that depend on the model (class
ids, layers, heads, channels) are checked against the model by the API, also as 422.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

Fusion = Literal["mean", "max", "min"]
Format = Literal["png", "json"]

_MODEL = Field(None, description="model alias from GET /models; default: the first configured model")
_FORMAT = Field("png", description="png: heatmap over the uploaded image; json: the raw map (always json for several images)")


class _Params(BaseModel):
    """Fields every endpoint takes. Unknown fields are refused (a typo must not pass silently)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    model: str | None = _MODEL


class RolloutParams(_Params):
    head_fusion: Fusion = Field("max", description="how the heads of a layer are fused")
    discard_ratio: float = Field(0.9, ge=0.0, lt=1.0, description="share of lowest attentions zeroed per layer")
    format: Format = _FORMAT


class GradRolloutParams(_Params):
    category_id: int = Field(..., ge=0, description="class to explain, 0 <= id < number of classes")
    head_fusion: Fusion = Field("mean", description="how the heads of a layer are fused")
    discard_ratio: float = Field(0.9, ge=0.0, lt=1.0, description="share of lowest weights zeroed per layer")
    format: Format = _FORMAT


class AttentionParams(_Params):
    head: Union[Annotated[int, Field(ge=0)], Fusion] = Field(
        0, description="head index (0 <= head < heads), or mean|max|min over heads"
    )
    format: Format = _FORMAT


class QKParams(_Params):
    layer: int = Field(0, ge=0, description="block index, 0 <= layer < layers")
    head: int = Field(0, ge=0, description="head index, 0 <= head < heads")
    channel: int = Field(0, ge=0, description="channel of the head, 0 <= channel < head dim")
    which: Literal["q", "k"] = Field("q", description="q (queries) or k (keys)")
    format: Format = _FORMAT


class PredictParams(_Params):
    pass
