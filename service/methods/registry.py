"""The one table every method is registered in, and each method's parameters as GET /methods lists them."""

from __future__ import annotations

from typing import TYPE_CHECKING, get_args

from schemas import responses as rs
from schemas.requests import Params

if TYPE_CHECKING:
    from service.methods.base import Method

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
            when=prop.get("x-when"), description=prop.get("description", ""),
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
