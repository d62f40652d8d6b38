"""Several methods' maps of one image from the passes they share (POST /compare), each scored.

Not a route of its own (not registered): the compare endpoint (service/api/compare.py) turns its
settings into one job per pass the image needs:

- one autograd pass per distinct `category_id` among the settings that need gradients: every
  setting with that class is computed from it, and the first such job also computes the
  settings that need only the attention, from the same pass's whole attention;
- with no gradient setting, one plain pass that keeps every block's whole attention.

Every setting's map is computed by its own method's `compute`, on what its own `needs` name
(a plain setting's reduction applied to the kept attention), so a setting's map is the one a
request of that method alone gets. Its faithfulness is scored like any other map's.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import ConfigDict, ValidationError

from schemas import requests as rq
from service.engine.contract import Captured, Job, ModelShape, Needs, Result, WholeAttention
from service.methods.base import InvalidParams, OnePassMethod, predictions
from service.methods.registry import REGISTRY

MAX_SETTINGS = 8


class CompareJob(rq.Params):
    """One pass's share of a comparison: the settings (method name, its Params) it computes."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    settings: tuple[tuple[str, Any], ...]
    category_id: int | None = None  # the class of the autograd pass; None: a plain pass
    faithfulness: bool = True
    faithfulness_steps: int = rq.faithfulness_steps()
    removal: rq.Removal = rq.removal()
    order: rq.Order = rq.order()


class Compare(OnePassMethod):
    name = "compare"
    summary = "several methods' maps of one image, from the passes they share, each scored"
    Params = CompareJob
    faithful = True  # every setting's map is scored
    comparable = False  # it compares the comparable ones

    def needs(self, p: CompareJob, shape: ModelShape) -> Needs:
        if p.category_id is not None:
            return Needs(grad_class=p.category_id)
        return Needs(reduce=WholeAttention(), layers=frozenset(range(shape.layers)) | shape.pool)

    def compute(self, p: CompareJob, c: Captured, shape: ModelShape) -> torch.Tensor:
        """-> (b, S, gh, gw): the map of every setting, in order."""
        whole = c.attn or [c.reduced[b] for b in range(shape.layers + len(shape.pool))]  # per block (b, H, Nq, N)
        maps = []
        for name, sp in p.settings:
            method = REGISTRY[name]
            n = method.needs(sp, shape)
            if n.grad_class is not None:
                own = Captured(logits=c.logits, attn=c.attn, grads=c.grads)
            else:
                reduced = {}
                for b in sorted(n.layers):
                    a = whole[b].float()
                    reduced[b] = a.new_empty(a.shape[0], *n.reduce.shape(*a.shape[1:]))
                    n.reduce(a, out=reduced[b])
                own = Captured(logits=c.logits, reduced=reduced)
            maps.append(method.compute(sp, own, shape))
        return torch.stack(maps, dim=1)

    def frames(self, p: CompareJob) -> int:
        """One map per setting of the pass (scored like a sweep's frames); no picture is drawn."""
        return len(p.settings)

    def explained_classes(self, p: CompareJob, r: Result, shape: ModelShape) -> list[int]:
        top = r.predictions[0].class_id
        return [top if getattr(sp, "category_id", None) is None else int(sp.category_id) for _, sp in p.settings]


COMPARE = Compare()


def plan(settings: list[tuple[str, Any]], shape: ModelShape, steps: int, removal: str,
         order: str) -> list[tuple[Job, list[int]]]:
    """The jobs of a comparison, each with the indices of the settings it computes (see the module doc)."""
    by_class: dict[int, list[int]] = {}
    plain = []
    for i, (name, sp) in enumerate(settings):
        cls = REGISTRY[name].needs(sp, shape).grad_class
        if cls is not None:
            by_class.setdefault(cls, []).append(i)
        else:
            plain.append(i)
    groups: list[tuple[int | None, list[int]]] = list(by_class.items()) or [(None, [])]
    groups[0] = (groups[0][0], groups[0][1] + plain)
    out = []
    for cls, idx in groups:
        p = CompareJob(settings=tuple(settings[i] for i in idx), category_id=cls, faithfulness_steps=steps,
                       removal=removal, order=order)
        out.append((Job(COMPARE, p), idx))
    return out


# -- the settings in, the answer out (shared by the route and the command line) ----------------------
class BadSettings(ValueError):
    """Settings that cannot be compared: `errors` in pydantic's shape, each `loc` naming its setting."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(e["msg"] for e in errors))
        self.errors = errors


def comparable() -> list[str]:
    return [m.name for m in REGISTRY.values() if m.comparable]


def validate(settings: list[tuple[str, dict[str, Any]]], shape: ModelShape) -> list[tuple[str, Any]]:
    """(method name, raw params) per setting -> (name, its validated Params), checked against the model as
    that method's own request would be, or BadSettings listing every error with loc ("settings", i, ...)."""
    errors, out = [], []
    for i, (name, params) in enumerate(settings):
        at = ("settings", i)
        method = REGISTRY.get(name)
        if method is None or not method.comparable:
            errors.append({"type": "value_error", "loc": (*at, "method"), "input": name,
                           "msg": f"settings[{i}]: a method that answers one map is needed: {', '.join(comparable())}"})
            continue
        top = sorted(set(params) & (rq.REQUEST_FIELDS | rq.FAITHFULNESS_FIELDS))
        if top:
            errors += [{"type": "value_error", "loc": (*at, "params", f), "input": params[f],
                        "msg": f"settings[{i}]: {f} is set for the whole comparison, at the top level"} for f in top]
            continue
        try:
            sp = method.Params.model_validate(params)
        except ValidationError as e:
            errors += [{**err, "loc": (*at, "params", *err["loc"]), "msg": f"settings[{i}]: {err['msg']}"}
                       for err in e.errors(include_url=False, include_context=False)]
            continue
        try:
            method.check(sp, shape)
        except InvalidParams as e:
            errors.append({"type": "value_error", "loc": (*at, "params", e.field), "input": getattr(sp, e.field),
                           "msg": f"settings[{i}]: {e}"})
            continue
        out.append((method.name, sp))
    if errors:
        raise BadSettings(errors)
    return out


def ranking(curves: list[Any], order: str) -> list[int]:
    """Best first: lowest deletion area (order most) or highest (order least); ties by lower index."""
    sign = 1.0 if order == "most" else -1.0
    return sorted(range(len(curves)), key=lambda i: (sign * curves[i].deletion_auc, i))


def answer(model: str, shape: ModelShape, settings: list[tuple[str, Any]], jobs: list[tuple[Job, list[int]]],
           results: list[Result], order: str) -> dict[str, Any]:
    """The JSON answer: every setting's map and faithfulness in the order asked, and the ranking."""
    masks: list[Any] = [None] * len(settings)
    curves: list[Any] = [None] * len(settings)
    for (_, idx), r in zip(jobs, results):
        for k, i in enumerate(idx):
            masks[i], curves[i] = r.maps[k], r.faithfulness[k]
    return {
        "model": model, "grid": shape.grid, "predictions": predictions(results[0], shape),
        "results": [{"method": name, "params": REGISTRY[name].echo(sp), "mask": masks[i].tolist(),
                     "faithfulness": curves[i].to_json()} for i, (name, sp) in enumerate(settings)],
        "ranking": ranking(curves, order),
    }
