"""Bounds on what parsing a request body may make the service do, whoever sends it.

- JSON: a request body is a small object (an `image` member and a few parameters), so before
  `json.loads` sees it, a pre-scan in C-speed steps (bytes.find/count, one regex per string that
  holds escapes) counts its structure and refuses deep nesting and floods of keys or values; the
  parse refuses NaN/Infinity, overflowing floats and absurdly long number literals, and the
  result is refused when a string is not valid Unicode (a lone surrogate). The whole parse runs
  in a worker thread, so the event loop keeps answering (health checks included).
- Text fields: one longer than MAX_TEXT_CHARS is refused before anything splits it.
- Multipart: a body without its closing boundary is refused (the parser would silently drop the
  last part).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any

from service.api.echoes import safe_text

MAX_FIELDS = 32  # members of a JSON body, or text fields of a multipart body
MAX_DEPTH = 8  # a valid body nests 2 deep ({"image": [...]})
MAX_NUMBER_CHARS = 64  # longest number literal; Python refuses ints over 4300 digits
MAX_TEXT_CHARS = 4096  # longest text parameter (a model alias, a comma-separated list of ratios)

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


class BodyError(ValueError):
    """A body refused by a limit: `status` is 400 (malformed) or 422 (well formed, unusable)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


# -- JSON -------------------------------------------------------------------------------------------
def prescan_json(body: bytes, max_tokens: int, max_depth: int = MAX_DEPTH) -> None:
    """Refuse (BodyError) a JSON text with more than max_tokens strings and punctuation, or nested
    deeper than max_depth, in time linear in its length with no Python step per byte.

    Strings are skipped whole: the next quote is found with bytes.find and, only when the string
    holds a backslash, its end with one regex match. Outside strings, brackets are walked (there
    are at most max_tokens of them) and commas and colons counted. Malformed text is left for
    json.loads to refuse.
    """
    n, pos, tokens, depth = len(body), 0, 0, 0
    while pos < n:
        q = body.find(b'"', pos)
        end = n if q < 0 else q
        tokens += body.count(b",", pos, end) + body.count(b":", pos, end)
        brackets = body.count(b"[", pos, end) + body.count(b"]", pos, end)
        brackets += body.count(b"{", pos, end) + body.count(b"}", pos, end)
        tokens += brackets
        if tokens > max_tokens:
            raise BodyError(400, f"the JSON body has more than {max_tokens} members, values and brackets")
        if brackets:
            for m in _BRACKETS.finditer(body, pos, end):
                depth += 1 if m.group() in (b"[", b"{") else -1
                if depth > max_depth:
                    raise BodyError(400, f"the JSON body nests deeper than {max_depth} levels")
        if q < 0:
            return
        close = body.find(b'"', q + 1)
        if close < 0:
            return  # unterminated string: json.loads says where
        if body.find(b"\\", q + 1, close) < 0:
            pos = close + 1
        else:
            m = _STRING.match(body, q)
            if m is None:
                return
            pos = m.end()
        tokens += 1
        if tokens > max_tokens:
            raise BodyError(400, f"the JSON body has more than {max_tokens} members, values and brackets")


def _number(kind):
    def parse(text: str):
        if len(text) > MAX_NUMBER_CHARS:
            raise BodyError(400, f"a number in the JSON body has {len(text)} characters, more than {MAX_NUMBER_CHARS}")
        value = kind(text)
        if isinstance(value, float) and not math.isfinite(value):
            raise BodyError(422, f"the number {safe_text(text, 40)} is out of range")
        return value

    return parse


def _constant(name: str):
    raise BodyError(422, f"{name} is not a number this API accepts (JSON has no NaN or Infinity)")


def _members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise BodyError(422, f"member {safe_text(repr(k), 80)} is given more than once")
        out[k] = v
    return out


def _check_unicode(node: Any) -> None:
    stack = [node]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if not x.isascii():
                try:
                    x.encode("utf-8")
                except UnicodeEncodeError:
                    raise BodyError(400, "the JSON body holds a string that is not valid Unicode "
                                         "(a lone surrogate)") from None
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)


def parse_json_body(body: bytes, max_images: int) -> tuple[dict[str, Any], list[bytes]]:
    """A JSON request body -> (parameter fields, decoded image bytes). Blocking: call it in a thread.

    Raises BodyError with 400 for malformed JSON and 422 for well-formed but unusable content.
    Only UTF-8 is JSON (RFC 8259): json.loads would also take UTF-16 and UTF-32 bytes, whose
    code units can hold the quote and bracket bytes the pre-scan steers by.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyError(400, f"the JSON body is not UTF-8 (byte {e.start}); JSON must be UTF-8") from None
    prescan_json(body, max_tokens=8 * MAX_FIELDS + 4 * max_images + 16)
    try:
        parsed = json.loads(text, parse_int=_number(int), parse_float=_number(float),
                            parse_constant=_constant, object_pairs_hook=_members)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BodyError(400, f"malformed JSON body: {safe_text(str(e), 200)}") from None
    except RecursionError:  # the pre-scan bounds depth; this stays as a second line
        raise BodyError(400, "the JSON body nests too deeply") from None
    _check_unicode(parsed)
    if not isinstance(parsed, dict):
        raise BodyError(422, "the JSON body must be an object with an `image` member")
    raw = parsed.pop("image", None)
    if len(parsed) > MAX_FIELDS:
        raise BodyError(422, f"the JSON body has {len(parsed)} members; at most {MAX_FIELDS} are read")
    encoded = raw if isinstance(raw, list) else [] if raw is None else [raw]
    if len(encoded) > max_images:
        raise BodyError(422, f"{len(encoded)} images in one request; the limit is {max_images}")
    images = []
    for i, item in enumerate(encoded):
        if not isinstance(item, str):
            raise BodyError(422, f"image[{i}] must be a base64 string")
        try:
            images.append(base64.b64decode(item.split(",", 1)[-1] if item.startswith("data:") else item, validate=True))
        except (binascii.Error, ValueError):
            raise BodyError(422, f"image[{i}] is not valid base64") from None
    return parsed, images


def long_text_fields(fields: dict[str, Any]) -> list[str]:
    """The parameters holding text longer than MAX_TEXT_CHARS: refused (422) before anything
    splits or validates them (a list sent as one comma-separated string would be split whole)."""
    return [key for key, value in fields.items()
            if any(isinstance(v, str) and len(v) > MAX_TEXT_CHARS
                   for v in (value if isinstance(value, list) else [value]))]


# -- multipart --------------------------------------------------------------------------------------
def check_multipart_closed(body: bytes, content_type: str) -> None:
    """Refuse (400) a multipart body that lacks its close delimiter (CRLF--boundary--): the parser
    would end it quietly and drop its last part (a `format=json` field, say)."""
    from python_multipart.multipart import parse_options_header

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        return  # the form parser refuses a missing boundary itself
    close = b"--" + boundary + b"--"
    if not (body.startswith(close) or (b"\r\n" + close) in body):
        raise BodyError(400, "malformed multipart body: the closing boundary is missing (the body was cut short)")
