"""What the service echoes of a request, made safe to send: in a JSON error detail (a short
excerpt that JSON and UTF-8 can always carry, never NaN, a lone surrogate or a megabyte of the
input) and in a header value (percent-encoded, so that no text can split or forge headers)."""

from __future__ import annotations

import math
from typing import Any

EXCERPT_CHARS = 64  # longest echo of an input value
MAX_ERRORS = 16  # validation errors listed in one answer
MAX_LOC_PARTS = 10  # parts of an error's location: the deepest JSON body (8 levels) and two more


def safe_text(text: str, limit: int = 300) -> str:
    """text -> at most `limit` characters that JSON and UTF-8 can always carry (lone surrogates
    and other unencodable characters are written as escapes)."""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


# Printable ASCII but "%": what a header value may carry as it is (RFC 9110 field-vchar and space).
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
MAX_HEADER_TEXT = 256  # characters of a text (a label, a model name) put into a header


def header_safe(text: str, limit: int = MAX_HEADER_TEXT) -> str:
    """Text from a model's config (a label) or the operator (a model alias) as a header value:
    percent-encoded UTF-8 outside printable ASCII (CR, LF, NUL, non-ASCII) and for "%" itself,
    so that no text can split, forge or break the answer's headers (urllib.parse.unquote reads
    it back); cut to `limit` characters first."""
    from urllib.parse import quote

    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return quote(text.encode("utf-8", "backslashreplace"), safe=_HEADER_SAFE)


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> Any:
    """An input value as a validation error may echo it: short, JSON-encodable, never NaN."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):  # str() of an int over 4300 digits raises: never convert a big one
        digits = int(value.bit_length() * 0.30103)
        return value if value.bit_length() <= 50 else f"<an integer of about {digits} digits>"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return safe_text(value, limit)
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (dict, list, tuple)):
        return f"<{type(value).__name__} of {len(value)}>"
    return f"<{type(value).__name__}>"


def safe_errors(errors: Any) -> list[dict[str, Any]]:
    """pydantic/FastAPI validation errors -> a short list of plain, encodable dicts."""
    out = []
    for err in list(errors)[:MAX_ERRORS]:
        err = err if isinstance(err, dict) else {"msg": str(err)}
        loc = [x if isinstance(x, int) and not isinstance(x, bool) else safe_text(str(x), EXCERPT_CHARS)
               for x in err.get("loc", ())][:MAX_LOC_PARTS]
        item = {"type": safe_text(str(err.get("type", "value_error")), 64), "loc": loc,
                "msg": safe_text(str(err.get("msg", "")), 200)}
        if "input" in err:
            item["input"] = excerpt(err["input"])
        out.append(item)
    return out
