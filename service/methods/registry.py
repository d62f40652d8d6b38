"""The one table every method is registered in."""

from __future__ import annotations

from typing import get_args

from schemas import responses as rs
from schemas.requests import FAITHFULNESS_FIELDS
from service.methods.base import MaskMethod, Method

REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: one instance of the method in REGISTRY, under its name."""
    if cls.name in REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
    fmt = cls.Params.model_fields.get("format")
    cls.formats = tuple(get_args(fmt.annotation)) if fmt is not None else ("json",)  # declared once, in Params
    if fmt is not None and fmt.default != cls.formats[0]:
        raise ValueError(f"method {cls.name!r}: the default format must come first in its Literal")
    if cls.kind == "long" and not (set(cls.formats) <= {"json", "png"} and issubclass(cls.Response, rs.LongResponse)):
        raise ValueError(f"method {cls.name!r}: long work answers rs.LongResponse (json) or its picture (png)")
    _check_declarations(cls)
    REGISTRY[cls.name] = cls()
    return cls


def _check_declarations(cls: type[Method]) -> None:
    """`faithful` and `comparable` declared by the method itself (never inherited by accident), and true."""
    for attr in ("faithful", "comparable"):
        if not isinstance(cls.__dict__.get(attr), bool):
            raise ValueError(f"method {cls.name!r}: declare `{attr} = True` or `False` in its class")
    if cls.faithful != (FAITHFULNESS_FIELDS <= set(cls.Params.model_fields)):
        raise ValueError(f"method {cls.name!r}: faithful={cls.faithful}, but its Params "
                         f"{'lack' if cls.faithful else 'have'} the faithfulness options")
    if cls.comparable and not (cls.faithful and issubclass(cls, MaskMethod)):
        raise ValueError(f"method {cls.name!r}: a comparable method is a faithful MaskMethod (one map)")
