"""Each method's parameters as GET /methods and the README describe them, read from its Params model's
JSON schema (the bounds, choices and `x-` declarations the fields carry)."""

from __future__ import annotations

from schemas import responses as rs
from schemas.requests import Params


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
            when=prop.get("x-when"), role=prop.get("x-role"), description=prop.get("description", ""),
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
