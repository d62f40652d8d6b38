"""The shared base of every explanation method, and its two kinds.

A method is one module that declares, once, on `OnePassMethod` or `LongMethod`:

    Params     its parameters (a pydantic model: names, ranges, defaults, descriptions)
    needs      what it needs from the forward pass (`Needs`, service/engine/contract.py)
    to_json    its JSON answer
    draw       its picture (encoded by `render`; `render` itself for animations)

and the hooks of its kind:

    one-pass   compute: its pure batched computation over what one pass captured
    long       steps, start, shifted, objective, update, result: long work, one batched step at a
               time, whose progress the service streams (server-sent events)

It registers itself with `@register` (service/methods/registry.py). Routes, model-dependent range
checks, `GET /methods`, the client's checks, the command line and the explorer page all come from
what is declared here; the engine runs whatever the jobs of a batch declare.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel

from schemas import responses as rs
from schemas.requests import FAITHFULNESS_FIELDS, REQUEST_FIELDS, Params
from service import imaging
from service.engine.contract import Captured, Job, ModelShape, Needs, Result
from service.engine.faithfulness import Ask
from service.methods.params import param_infos

Kind = Literal["one-pass", "long"]


class InvalidParams(ValueError):
    """A parameter out of range for the chosen model (422), e.g. a class id past the last class."""

    def __init__(self, field: str, msg: str) -> None:
        super().__init__(f"{field}: {msg}")
        self.field = field


class Method:
    """What every method declares. Subclass one of the two kinds below, not this."""

    kind: ClassVar[Kind]
    name: ClassVar[str]
    path: ClassVar[str] = ""  # default "/<name>"
    summary: ClassVar[str]
    Params: ClassVar[type[Params]]
    Response: ClassVar[type[BaseModel]]
    formats: ClassVar[tuple[str, ...]] = ("json",)  # set by `register` from Params' `format` (default first)
    image: ClassVar[Literal["required", "optional"]] = "required"
    max_images: ClassVar[int | None] = None  # images per request; None: as many as the service allows
    # Parameters that may differ between images computed together (e.g. category_id, which acts
    # through each image's own backward pass): left out of the group key.
    per_image: ClassVar[tuple[str, ...]] = ()
    # Every method declares both, in its own class body (`register` refuses one that inherits them):
    # `faithful`: its maps are over the patches and it takes the faithfulness options (its Params have
    # the FAITHFULNESS_FIELDS, e.g. derive from schemas.requests.Faithful); the engine scores its maps
    # after the pass (service/engine/faithfulness.py). `comparable`: a faithful one-pass method that
    # answers one map (a MaskMethod), so it can be a setting of POST /compare and of the explorer's
    # default comparison.
    faithful: ClassVar[bool]
    comparable: ClassVar[bool]

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

    def needs(self, p: Params, shape: ModelShape) -> Needs:
        return Needs()

    # -- answers ---------------------------------------------------------------------------------
    def to_json(self, p: Params, r: Result, shape: ModelShape) -> dict[str, Any]:
        raise NotImplementedError

    def draw(self, p: Params, img: Image.Image | None, r: Result, shape: ModelShape) -> np.ndarray:
        """uint8 (H, W) or (H, W, 3), encoded by `render`."""
        raise NotImplementedError

    def render(self, p: Params, img: Image.Image | None, r: Result, shape: ModelShape) -> tuple[bytes, str]:
        """The picture answer in the requested format (png, jpeg or webp) and its media type."""
        return imaging.encode(self.draw(p, img, r, shape), p.format), imaging.MEDIA_TYPES[p.format]

    def canvas(self, p: Params) -> int | None:
        """The picture this answer draws over the upload: None for none (JSON, or a picture not
        of the upload), else the longest side it is drawn at (0: the upload's own size). Decoding
        makes the upload at this size (`img` of draw/render), never larger. The side is at most
        what the format's encoder writes (imaging.MAX_SIDES): 0 and larger sides are drawn at that
        limit when the upload is larger, so that no request fails in the encoder after its work."""
        side = getattr(p, "max_side", None)
        fmt = getattr(p, "format", "json")
        if side is None or fmt == "json":
            return None
        limit = imaging.MAX_SIDES[fmt]
        return limit if side == 0 else min(side, limit)

    def frames(self, p: Params) -> int:
        """How many pictures of the canvas's size the answer holds at once (the pixel budget)."""
        return 1

    # -- description -----------------------------------------------------------------------------
    def images_per_request(self, limit: int) -> int:
        """How many images one request may carry, under the service's `limit` (--max-images)."""
        return limit if self.max_images is None else min(self.max_images, limit)

    def info(self, limit: int) -> rs.MethodInfo:
        """GET /methods' entry; limit: the service's --max-images."""
        return rs.MethodInfo(name=self.name, path=self.route, summary=self.summary, kind=self.kind, image=self.image,
                             max_images=self.images_per_request(limit),
                             faithful=self.faithful, comparable=self.comparable,
                             formats=list(self.formats), params=param_infos(self.Params))


class OnePassMethod(Method):
    """A map from one pass: implement `needs`, `compute`, `to_json` and `draw`."""

    kind = "one-pass"

    def compute(self, p: Params, c: Captured, shape: ModelShape) -> torch.Tensor | None:
        """The maps of a group of images with equal parameters (but `per_image`): (b, ...) or None."""
        return None

    # -- faithfulness ----------------------------------------------------------------------------
    def faithfulness(self, p: Params, r: Result, shape: ModelShape) -> Ask | None:
        """The scores to compute of this image's maps after the pass, when it asked for them."""
        if not (self.faithful and getattr(p, "faithfulness", False)):
            return None
        maps = torch.from_numpy(r.maps).reshape(-1, *shape.grid)  # (F, gh, gw): one per frame
        classes = tuple(self.explained_classes(p, r, shape))
        return Ask(maps, classes, p.faithfulness_steps, p.removal, p.order)

    def forwards(self, p: Params) -> int:
        """The forward passes scoring this image's maps will cost at most, charged before admission:
        frames x (steps + 1) x 2 when it asked, else 0."""
        if not (self.faithful and getattr(p, "faithfulness", False)):
            return 0
        return self.frames(p) * (p.faithfulness_steps + 1) * 2

    def explained_classes(self, p: Params, r: Result, shape: ModelShape) -> list[int]:
        """The class each of the result's maps explains: `category_id` where the method has one, else
        the top prediction; one per map (frame) in `r.maps`."""
        frames = int(np.prod(r.maps.shape[:-2])) if r.maps.ndim > 2 else 1
        cls = getattr(p, "category_id", None)
        return [r.predictions[0].class_id if cls is None else int(cls)] * frames


class MaskMethod(OnePassMethod):
    """A method whose answer is one mask over the patches: JSON `mask`, PNG heatmap over the image."""

    Response = rs.MaskResponse

    def to_json(self, p: Params, r: Result, shape: ModelShape) -> dict[str, Any]:
        out = {"model": shape.name, "method": self.name, "params": self.echo(p), "grid": shape.grid,
               "mask": r.maps.tolist(), "predictions": predictions(r, shape)}
        if r.faithfulness:
            out["faithfulness"] = r.faithfulness[0].to_json()
        return out

    def draw(self, p: Params, img: Image.Image, r: Result, shape: ModelShape) -> np.ndarray:
        return imaging.overlay(img, r.maps)


class LongMethod(Method):
    """Long work with progress: `steps(p)` batched steps, each through the model once (the engine's
    `step`), run in the background lane beside the other sessions of the model; its progress streams
    as server-sent events. Implement the hooks below, `to_json` and `draw`."""

    kind = "long"
    image = "optional"  # the state starts from the upload, or from nothing
    max_images = 1

    def steps(self, p: Params) -> int:
        """How many steps the work takes (the progress's total)."""
        raise NotImplementedError

    def start(self, p: Params, pixels: np.ndarray | None, shape: ModelShape) -> Any:
        """The state to step: pixels is the upload as uint8 (H, W, 3) at the model's input size, or None."""
        raise NotImplementedError

    def shifted(self, p: Params, state: Any) -> torch.Tensor:
        """This step's input (3, H, W): pixel values in [0, 1] at the model's input size."""
        raise NotImplementedError

    def objective(self, p: Params, c: Captured, x: torch.Tensor,
                  shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (the value (b,), the penalty (b,)) for a group of equal parameters; a step ascends value - penalty."""
        raise NotImplementedError

    def update(self, p: Params, state: Any, grad: torch.Tensor, value: float) -> None:
        """Take the step in place from the gradient (3, H, W) of value - penalty at `shifted`'s input."""
        raise NotImplementedError

    def result(self, p: Params, state: Any) -> Result:
        """The answer of the finished (or stopped) work."""
        raise NotImplementedError


def predictions(r: Result, shape: ModelShape) -> list[dict[str, Any]]:
    return [{"class_id": p.class_id, "label": shape.labels[p.class_id], "score": p.score} for p in r.predictions]
