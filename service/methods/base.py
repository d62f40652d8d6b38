"""The shared base of every explanation method, and the one table they are registered in.

A method is one module that declares, once:

    Params     its parameters (a pydantic model: names, ranges, defaults, descriptions)
    needs      what it needs from the forward pass (`Needs`)
    compute    its pure batched computation over what the pass captured
    to_json    its JSON answer
    draw       its picture (encoded by `render`; `render` itself for animations)

and registers itself with `@register`. Routes, model-dependent range checks and `GET /methods`
all come from REGISTRY; the engine runs whatever the jobs of a batch declare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel

from schemas import responses as rs
from schemas.requests import FAITHFULNESS_FIELDS, REQUEST_FIELDS, Fusion, Params
from service import imaging
from service.engine import ops
from service.engine.jobs import Job, Result


class InvalidParams(ValueError):
    """A parameter out of range for the chosen model (422), e.g. a class id past the last class."""

    def __init__(self, field: str, msg: str) -> None:
        super().__init__(f"{field}: {msg}")
        self.field = field


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

    @property
    def classes(self) -> int:
        return len(self.labels)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, device=like.device, dtype=like.dtype)[:, None, None]
        std = torch.tensor(self.std, device=like.device, dtype=like.dtype)[:, None, None]
        return mean, std

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) pixel values in [0, 1] -> the model's input: (x - mean) / std."""
        mean, std = self._stats(pixels)
        return (pixels - mean) / std


# -- what a method needs from the pass ----------------------------------------------------------
@dataclass(frozen=True)
class FuseHeads:
    """Keep fuse(A_l) (N, N) per image: the heads fused as soon as the attention is made."""

    fusion: Fusion
    buffer: ClassVar[str] = "fused"

    @staticmethod
    def shape(heads: int, n: int) -> tuple[int, ...]:
        return (n, n)

    def __call__(self, a: torch.Tensor, out: torch.Tensor) -> None:
        ops.fuse_heads(a, self.fusion, out=out)  # a (b, H, N, N) -> out (b, N, N)


@dataclass(frozen=True)
class ClassRow:
    """Keep the class token's row A_l[:, 0, :] (H, N) per image."""

    buffer: ClassVar[str] = "cls"

    @staticmethod
    def shape(heads: int, n: int) -> tuple[int, ...]:
        return (heads, n)

    def __call__(self, a: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(a[:, :, 0])


@dataclass(frozen=True)
class WholeAttention:
    """Keep A_l (H, N, N) per image, whole: for computing several methods' maps from one pass (POST /compare)."""

    buffer: ClassVar[str] = "whole"

    @staticmethod
    def shape(heads: int, n: int) -> tuple[int, ...]:
        return (heads, n, n)

    def __call__(self, a: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(a)


Reduction = FuseHeads | ClassRow | WholeAttention


@dataclass(frozen=True)
class Needs:
    """What one job needs from the forward pass.

    grad    the autograd pass: every block's whole attention and its gradient with respect to
            the logit of the job's `category_id` (methods with `grad` must have that field)
    reduce  the plain pass: the attention of `layers` reduced as it is made (never kept whole)
    qk      q and k (after the q/k norm) of these blocks
    features  the output (B, N, C) of these blocks
    """

    grad: bool = False
    reduce: Reduction | None = None
    layers: frozenset[int] = frozenset()
    qk: frozenset[int] = frozenset()
    features: frozenset[int] = frozenset()


@dataclass
class Captured:
    """What a pass captured, for the rows of one group of jobs. Per block lists are in block order.

    reduced  block -> (b, ...) the `reduce` of the group (plain pass)
    attn     per block (b, H, N, N) post-softmax, float32, and grads dy_c/dA (autograd pass)
    q, k     block -> (b, H, N, D)
    features block -> (b, N, C)
    """

    logits: torch.Tensor  # (b, classes)
    reduced: dict[int, torch.Tensor] = field(default_factory=dict)
    attn: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    q: dict[int, torch.Tensor] = field(default_factory=dict)
    k: dict[int, torch.Tensor] = field(default_factory=dict)
    features: dict[int, torch.Tensor] = field(default_factory=dict)


# -- the base ---------------------------------------------------------------------------------
class Method:
    """Subclass, set the class attributes, implement `needs`, `compute`, `to_json` and `draw`."""

    name: ClassVar[str]
    path: ClassVar[str] = ""  # default "/<name>"
    summary: ClassVar[str]
    Params: ClassVar[type[Params]]
    Response: ClassVar[type[BaseModel]]
    formats: ClassVar[tuple[str, ...]] = ("json",)  # set by `register` from Params' `format` (default first)
    image: ClassVar[Literal["required", "optional"]] = "required"
    # Parameters that may differ between images computed together (e.g. category_id, which acts
    # through each image's own backward pass): left out of the group key.
    per_image: ClassVar[tuple[str, ...]] = ()
    # Iterative methods (activation maximization) run step by step in the background lane, through
    # `start`, `shifted`, `objective`, `update` and `result` instead of `compute`.
    iterative: ClassVar[bool] = False
    # Methods whose maps are over the patches declare `faithful` and take the faithfulness option
    # (their Params derive from schemas.requests.Faithful): the engine scores their maps after the
    # pass (service/engine/faithfulness.py). `comparable` ones answer one map and can be compared
    # (POST /compare).
    faithful: ClassVar[bool] = False
    comparable: ClassVar[bool] = False

    @property
    def route(self) -> str:
        return self.path or f"/{self.name}"

    # -- validation ------------------------------------------------------------------------------
    def check(self, p: Params, shape: ModelShape) -> None:
        """Model-dependent ranges: every field declared with `below(bound)` must be < shape.bound."""
        for name, f in type(p).model_fields.items():
            bound = (f.json_schema_extra or {}).get("x-below") if isinstance(f.json_schema_extra, dict) else None
            value = getattr(p, name)
            if bound and isinstance(value, int) and not isinstance(value, bool):
                limit = getattr(shape, bound)
                if value >= limit:
                    raise InvalidParams(name, f"must be < {limit} (model {shape.name!r} has {limit} {bound})")

    def job(self, p: Params) -> Job:
        return Job(self, p)

    def group_key(self, p: Params) -> Params:
        drop = (*self.per_image, *REQUEST_FIELDS, *FAITHFULNESS_FIELDS)
        return p.model_copy(update={f: None for f in drop if f in type(p).model_fields})

    @staticmethod
    def echo(p: Params) -> dict[str, Any]:
        """The parameters as answers repeat them: the method's own, without model and format (and the
        faithfulness option, which its answer reports on its own)."""
        return p.model_dump(mode="json", exclude=REQUEST_FIELDS | FAITHFULNESS_FIELDS)

    # -- faithfulness ----------------------------------------------------------------------------
    def asks_faithfulness(self, p: Params) -> bool:
        return self.faithful and bool(getattr(p, "faithfulness", False))

    def explained_classes(self, p: Params, r: Result, shape: ModelShape) -> list[int]:
        """The class each of the result's maps explains: `category_id` where the method has one, else
        the top prediction; one per map (frame) in `r.maps`."""
        frames = int(np.prod(r.maps.shape[:-2])) if r.maps.ndim > 2 else 1
        cls = getattr(p, "category_id", None)
        return [r.predictions[0].class_id if cls is None else int(cls)] * frames

    # -- computation -----------------------------------------------------------------------------
    def needs(self, p: Params, shape: ModelShape) -> Needs:
        return Needs()

    def compute(self, p: Params, c: Captured, shape: ModelShape) -> torch.Tensor | None:
        """The maps of a group of images with equal parameters (but `per_image`): (b, ...) or None."""
        return None

    # -- answers ---------------------------------------------------------------------------------
    def to_json(self, p: Params, r: Result, shape: ModelShape) -> dict[str, Any]:
        raise NotImplementedError

    def draw(self, p: Params, img: Image.Image, r: Result, shape: ModelShape) -> np.ndarray:
        """uint8 (H, W) or (H, W, 3), encoded as PNG by `render`."""
        raise NotImplementedError

    def render(self, p: Params, img: Image.Image, r: Result, shape: ModelShape) -> tuple[bytes, str]:
        """The picture answer in the requested format (png, jpeg or webp) and its media type."""
        return imaging.encode(self.draw(p, img, r, shape), p.format), imaging.MEDIA_TYPES[p.format]

    def canvas(self, p: Params) -> int | None:
        """The picture this answer draws over the upload: None for none (JSON, or a picture not
        of the upload), else the longest side it is drawn at (0: the upload's own size). Decoding
        makes the upload at this size (`img` of draw/render), never larger."""
        side = getattr(p, "max_side", None)
        return None if side is None or getattr(p, "format", "json") == "json" else side

    def frames(self, p: Params) -> int:
        """How many pictures of the canvas's size the answer holds at once (the pixel budget)."""
        return 1

    # -- description -----------------------------------------------------------------------------
    def info(self) -> rs.MethodInfo:
        return rs.MethodInfo(name=self.name, path=self.route, summary=self.summary, image=self.image,
                             formats=list(self.formats), params=param_infos(self.Params))


def predictions(r: Result, shape: ModelShape) -> list[dict[str, Any]]:
    return [{"class_id": p.class_id, "label": shape.labels[p.class_id], "score": p.score} for p in r.predictions]


# -- the registry -----------------------------------------------------------------------------
REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: one instance of the method in REGISTRY, under its name."""
    if cls.name in REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
    fmt = cls.Params.model_fields.get("format")
    cls.formats = tuple(get_args(fmt.annotation)) if fmt is not None else ("json",)  # declared once, in Params
    if fmt is not None and fmt.default != cls.formats[0]:
        raise ValueError(f"method {cls.name!r}: the default format must come first in its Literal")
    REGISTRY[cls.name] = cls()
    return cls


def param_infos(params: type[Params]) -> list[rs.ParamInfo]:
    """Each field of a Params model as GET /methods and the README describe it."""
    schema = params.model_json_schema()
    out = []
    for name, prop in schema.get("properties", {}).items():
        if name == "model":
            continue
        out.append(rs.ParamInfo(
            name=name, type=_type_name(prop), required=name in schema.get("required", []),
            default=prop.get("default"), enum=_enum(prop), minimum=prop.get("minimum"),
            exclusive_minimum=prop.get("exclusiveMinimum"), maximum=prop.get("maximum"),
            exclusive_maximum=prop.get("exclusiveMaximum"), below=prop.get("x-below"),
            description=prop.get("description", ""),
        ))
    return out


def _enum(prop: dict) -> list | None:
    values = [v for alt in prop.get("anyOf", [prop]) for v in alt.get("enum", [])]
    return values or None


def _type_name(prop: dict) -> str:
    alts = prop.get("anyOf", [prop])
    names = []
    for a in alts:
        if "enum" in a:
            names.append("|".join(str(v) for v in a["enum"]))
        elif a.get("type") == "array":
            names.append(f"list of {a.get('items', {}).get('type', 'value')}")
        else:
            names.append(a.get("type", "value"))
    return " or ".join(names)


def markdown_table() -> str:
    """The README's table of methods, parameters and defaults, made from the registry."""
    lines = ["| endpoint | parameters (default) | formats (default first) |", "|---|---|---|"]
    for m in REGISTRY.values():
        shown = [p for p in param_infos(m.Params) if p.name != "format" and p.name not in FAITHFULNESS_FIELDS]
        params = "; ".join(_param_md(p) for p in shown) or "none"
        if m.faithful:
            params += "; the faithfulness options"
        lines.append(f"| `POST {m.route}` | {params.replace('|', chr(92) + '|')} | {', '.join(m.formats)} |")
    return "\n".join(lines)


def _param_md(p: rs.ParamInfo) -> str:
    rng = []
    if p.minimum is not None or p.exclusive_minimum is not None:
        rng.append(f">= {p.minimum:g}" if p.minimum is not None else f"> {p.exclusive_minimum:g}")
    if p.maximum is not None or p.exclusive_maximum is not None:
        rng.append(f"<= {p.maximum:g}" if p.maximum is not None else f"< {p.exclusive_maximum:g}")
    if p.below:
        rng = [f"0 <= v < {p.below}"]
    kind = p.type if p.enum is None or p.below else "|".join(str(v) for v in p.enum)
    default = "required" if p.required else f"`{_show(p.default)}`"
    return f"`{p.name}` {kind}{' ' + ', '.join(rng) if rng else ''} ({default})"


def _show(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
    return "none" if v is None else str(v)
