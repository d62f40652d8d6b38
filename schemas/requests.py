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
# Overlays and montages are photographs: JPEG and WebP are a fraction of a PNG's size and time.
PictureFormat = Literal["png", "jpeg", "webp", "json"]
MAX_SIDE = 16384  # the largest max_side accepted: beyond any upload the pixel limit lets through

# Fields of every request that are about the request, not the method: never part of a job's key
# and not echoed in `params` of the answers.
REQUEST_FIELDS = frozenset({"model", "format", "max_side"})

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


def max_side(default: int = 1024) -> Any:
    """The `max_side` field of answers drawn over the upload."""
    return Field(default, ge=0, le=MAX_SIDE, description="longest side of the picture answer in pixels "
                 "(the upload is never enlarged); 0 keeps the upload's size; never past the format's own limit "
                 "(webp 16383, jpeg 65500, gif 65535, png 1000000)")


def below(bound: Bound, default: Any = ..., description: str = "", when: dict[str, list[Any]] | None = None) -> Any:
    """An index field: 0 <= value < the model's `bound` (checked per model by the API, 422).
    `when`: the field applies only when these other fields have one of these values (see `applies`)."""
    return Field(default, ge=0, description=f"{description}, 0 <= value < {bound}".lstrip(", "),
                 json_schema_extra={"x-below": bound, **applies(when)})


def applies(when: dict[str, list[Any]] | None) -> dict[str, Any]:
    """json_schema_extra declaring that a field applies only when other fields have these values
    (GET /methods' `when`; the explorer page shows the field only then), e.g. {"target": ["class"]}."""
    return {"x-when": when} if when else {}


# What a client (the explorer page) may do with a parameter without knowing its name: GET /methods' `role`.
ROLES = {
    "frames": "the values the answer's frames are made at, one per frame, in order (a label for each frame)",
    "frame-ms": "how long each frame of an animated answer shows, in milliseconds",
}


def role(name: str) -> dict[str, Any]:
    """json_schema_extra declaring a parameter's role (ROLES), e.g. Field(..., json_schema_extra=role("frames"))."""
    if name not in ROLES:
        raise ValueError(f"unknown role {name!r}: one of {sorted(ROLES)}")
    return {"x-role": name}


def head_fusion(default: Fusion) -> Any:
    return Field(default, description="how the heads of a block are fused: mean, max or min")


def discard_ratio(what: str = "attentions") -> Any:
    return Field(0.9, ge=0.0, lt=1.0, description=f"share of the lowest {what} zeroed per block")


def start_layer() -> Any:
    return below("layers", 0, "first block of the chain (skip early blocks that attend to one patch)")


# -- faithfulness: perturbation tests of a map, asked for on any method that returns one ----------
Removal = Literal["blur", "mean"]
Order = Literal["most", "least"]
MAX_FAITHFULNESS_STEPS = 64
# The fields below are about scoring the map, not computing it: not part of a job's key, and
# answered in the result's own `faithfulness` object rather than echoed in `params`.
FAITHFULNESS_FIELDS = frozenset({"faithfulness", "faithfulness_steps", "removal", "order"})


def faithfulness_steps() -> Any:
    return Field(16, ge=1, le=MAX_FAITHFULNESS_STEPS,
                 description="k: the deletion and insertion curves have k + 1 points")


def removal() -> Any:
    return Field("blur", description="what a removed patch becomes: blur (the image blurred by a Gaussian of "
                                     "sigma = one patch) or mean (the image's per-channel mean)")


def order() -> Any:
    return Field("most", description="most: the map's most relevant patches go first; least: the least relevant")


class Faithful(Params):
    """The faithfulness option, for the methods whose answer is a map over the patches."""

    faithfulness: bool = Field(False, description="add deletion and insertion curves of the explained class and "
                                                  "their areas (2 x faithfulness_steps more forward passes)")
    faithfulness_steps: int = faithfulness_steps()
    removal: Removal = removal()
    order: Order = order()
