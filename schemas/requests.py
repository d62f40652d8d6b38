"""What every method's parameters are built from: the base model and the shared field types.

Each method declares its own parameters once, in its module under service/methods/, as a
subclass of `Params`. That one class is the source of the field names, ranges, defaults and
descriptions for request validation, the OpenAPI description, `GET /methods`, the engine's job
and the README table.

Parameters come as form fields of a multipart/form-data request (with one or more `image` file
parts), or as members of an application/json object (with `image` as a base64 string or a list
of them). Ranges that depend on the model (class ids, layers, heads, channels) are declared with
`below(...)` and checked against the model by the API, also as 422.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

Fusion = Literal["mean", "max", "min"]
Format = Literal["png", "json"]

# Fields of every request that are about the request, not the method: never part of a job's key
# and not echoed in `params` of the answers.
REQUEST_FIELDS = frozenset({"model", "format"})

# The model's dimensions a parameter can be bounded by (see `below`), as ModelShape names them.
Bound = Literal["classes", "layers", "heads", "head_dim", "embed_dim"]


class Params(BaseModel):
    """Fields every method takes. Unknown fields are refused (a typo must not pass silently).

    Frozen, so that equal parameters are equal jobs: the engine computes them together.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False, frozen=True)

    model: str | None = Field(None, description="model alias from GET /models; default: the first configured model")

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans(cls, v: Any, info: ValidationInfo) -> Any:
        """JSON true/false is not a number: pydantic's lax mode would take it as 1/0 for an integer
        or number field (or list item), which the published schema (integer, number) refuses."""
        if cls.model_fields[info.field_name].annotation is bool:
            return v
        if isinstance(v, bool) or (isinstance(v, (list, tuple)) and any(isinstance(x, bool) for x in v)):
            raise ValueError("a boolean (true/false) is not a value of this field; send a number or a string")
        return v


def fmt(default: str = "png", doc: str = "png: heatmap over the uploaded image; json: the raw map") -> Any:
    """The `format` field; several images are always answered as JSON."""
    return Field(default, description=f"{doc} (always json for several images)")


def below(bound: Bound, default: Any = ..., description: str = "") -> Any:
    """An index field: 0 <= value < the model's `bound` (checked per model by the API, 422)."""
    return Field(default, ge=0, description=f"{description}, 0 <= value < {bound}".lstrip(", "),
                 json_schema_extra={"x-below": bound})


def head_fusion(default: Fusion) -> Any:
    return Field(default, description="how the heads of a block are fused: mean, max or min")


def discard_ratio(what: str = "attentions") -> Any:
    return Field(0.9, ge=0.0, lt=1.0, description=f"share of the lowest {what} zeroed per block")


def start_layer() -> Any:
    return below("layers", 0, "first block of the chain (skip early blocks that attend to one patch)")
