"""The README's table of methods, parameters and defaults, made from the registry (`python -m service.methods`)."""

from __future__ import annotations

from typing import Any

from schemas import responses as rs
from schemas.requests import FAITHFULNESS_FIELDS
from service.methods.params import param_infos
from service.methods.registry import REGISTRY


def markdown_table() -> str:
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
