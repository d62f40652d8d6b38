"""Request bodies -> (validated parameters, image bytes), for multipart and for JSON.

multipart/form-data: one or more file parts named `image`, the parameters as form fields.
application/json: {"image": "<base64>" or ["<base64>", ...], ...parameters}.
Every way a body can be wrong ends here as a ClientError with the status to answer; the limits
that bound what a body can cost are in service/api/limits.py.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartException

from service import imaging
from service.api.limits import (MAX_FIELDS, MAX_TEXT_CHARS, BodyError, check_multipart_closed, guards_for,
                                long_text_fields, parse_json_body, safe_text)

P = TypeVar("P", bound=BaseModel)


class ClientError(ValueError):
    """A malformed request: `status` is what the API answers (400, 413, 415 or 422)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


async def read_request(
    request: Request, params_cls: type[P], max_images: int, image_required: bool = True
) -> tuple[P, list[bytes]]:
    """Parse, validate, and admit: every image's header is checked (format, frame size, decode
    cost) and the request's pixels are taken from the service's budget before anything is
    decoded, so nothing is decoded for a request that would be refused."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        fields, images = await _multipart(request, max_images)
    elif ctype == "application/json":
        fields, images = await _json(request, max_images)
    else:
        raise ClientError(415, f"send multipart/form-data or application/json, not {safe_text(ctype, 80) or 'no content type'!r}")
    if not images and image_required:
        raise RequestValidationError([{"type": "missing", "loc": ("body", "image"), "msg": "Field required", "input": None}])
    if len(images) > max_images:
        raise ClientError(422, f"{len(images)} images in one request; the limit is {max_images}")
    # Text over the bound is refused before validation (which runs here, on the event loop) can
    # split it; the other fields are still validated, so that the answer lists every error.
    long = long_text_fields(fields)
    errors = [{"type": "string_too_long", "loc": ("body", k), "input": fields[k],
               "msg": f"text longer than {MAX_TEXT_CHARS} characters"} for k in long]
    try:
        params = params_cls.model_validate({k: v for k, v in fields.items() if k not in long})
    except ValidationError as e:
        errors += [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False, include_context=False)
                   if not (err["type"] == "missing" and err["loc"][:1] and err["loc"][0] in long)]
    if errors:
        raise RequestValidationError(errors) from None
    # A method that draws one full-size picture per item of `discard_ratios` (the sweeps) holds
    # that many frames at once: each counts against the pixel budget like another image.
    drawn = getattr(params, "format", "json") != "json"
    frames = 1 + (len(getattr(params, "discard_ratios", None) or ()) if drawn else 0)
    await admit_images(request, images, frames)
    return params, images


async def admit_images(request: Request, images: list[bytes], frames: int = 1) -> None:
    """Check every image's header in a worker thread (ImageError as decoding would raise it,
    naming the image when there are several), then take their pixels from the budget shared by
    all requests (wait, or Busy -> 503); the middleware gives them back when the request ends."""
    ctx = getattr(request.app.state, "ctx", None)
    if ctx is None:
        return
    max_pixels = ctx.settings.max_pixels

    def inspect_all() -> int:
        total = 0
        for i, data in enumerate(images):
            try:
                w, h = imaging.inspect(data, max_pixels)
            except imaging.ImageError as e:
                if len(images) > 1:
                    raise type(e)(f"image {i}: {e}") from None
                raise
            total += w * h
        return total

    pixels = await run_in_threadpool(inspect_all)
    await guards_for(request.app).take_pixels(pixels * frames)


async def _multipart(request: Request, max_images: int) -> tuple[dict[str, Any], list[bytes]]:
    body = await request.body()  # bounded by the middleware's limit; form() parses this copy
    try:
        check_multipart_closed(body, request.headers.get("content-type", ""))
    except BodyError as e:
        raise ClientError(e.status, str(e)) from None
    try:
        form = await request.form(max_files=max_images + 1, max_fields=MAX_FIELDS)
    except (MultiPartException, ValueError) as e:  # the parser's complaints are the client's problem
        raise ClientError(400, f"malformed multipart body: {safe_text(str(e), 200)}") from None
    try:
        fields: dict[str, Any] = {}
        images: list[bytes] = []
        for key, value in form.multi_items():
            if key == "image":
                if not isinstance(value, UploadFile):
                    raise ClientError(422, "`image` must be a file part (curl -F image=@file.png), not a text field")
                images.append(await value.read())
            elif key in fields:
                raise ClientError(422, f"field {safe_text(repr(key), 80)} is given more than once")
            else:
                fields[key] = value if isinstance(value, str) else "<file>"
        return fields, images
    finally:
        await form.close()


async def _json(request: Request, max_images: int) -> tuple[dict[str, Any], list[bytes]]:
    body = await request.body()
    try:
        return await run_in_threadpool(parse_json_body, body, max_images)
    except BodyError as e:
        raise ClientError(e.status, str(e)) from None
