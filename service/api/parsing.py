"""Request bodies -> (validated parameters, image bytes), for multipart and for JSON.

multipart/form-data: one or more file parts named `image`, the parameters as form fields.
application/json: {"image": "<base64>" or ["<base64>", ...], ...parameters}.
image/jpeg, image/png, image/webp, ...: the body is one image, the parameters are in the query string.
Every way a body can be wrong ends here as a ClientError with the status to answer; the limits
that bound what parsing a body can cost are in service/api/bodies.py, the budgets it is admitted
under in service/api/admission.py.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from service import imaging
from service.api.admission import admission_for
from service.api.bodies import (
    MAX_FIELDS,
    MAX_TEXT_CHARS,
    BodyError,
    check_multipart_closed,
    long_text_fields,
    parse_json_body,
)
from service.api.echoes import safe_text

P = TypeVar("P", bound=BaseModel)


class ClientError(ValueError):
    """A malformed request: `status` is what the API answers (400, 413, 415 or 422)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


# Raw bodies: the image itself, with the parameters in the query string (services that send one
# image and want no multipart encoding). Any image/* type makes a raw body: the bytes say what the
# image is (a JPEG sent as image/jpg, image/pjpeg or image/png is explained all the same); bytes in
# no format the service decodes are refused with 415 when the declared type is none of RAW_TYPES
# (image/svg+xml, image/x-icon, ...), with the 422 of any undecodable upload when it is one of them.
# Uploads up to this many bytes in all have their headers read on the event loop (tens of
# microseconds); larger ones in a worker thread.
INLINE_INSPECT_BYTES = 256 * 1024
RAW_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff",
                       "image/heic", "image/heif", "image/avif"})


def _is_raw(ctype: str) -> bool:
    return ctype.startswith("image/")


async def read_request(
    request: Request, params_cls: type[P], max_images: int, image_required: bool = True
) -> tuple[P, list[bytes]]:
    """Parse and validate: the body (multipart, JSON or a raw image) -> (parameters, image bytes).
    Nothing is decoded here; `admit_images` checks the images' headers and budgets them."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "" and not _is_raw(ctype) and request.url.query:
        # never ignored in silence: a parameter there would otherwise be dropped, its default used
        raise ClientError(422, "the query string carries parameters only with a raw image body; "
                               "send them as form fields or JSON members")
    if ctype == "multipart/form-data":
        fields, images = await _multipart(request, max_images)
    elif ctype == "application/json":
        fields, images = await _json(request, max_images)
    elif _is_raw(ctype):
        fields, images = await _raw(request)
        request.state.raw_type = ctype
    else:
        raise ClientError(415, f"send multipart/form-data, application/json or the image itself "
                               f"({', '.join(sorted(RAW_TYPES))}), not {safe_text(ctype, 80) or 'no content type'!r}")
    if not images and image_required:
        raise RequestValidationError([{"type": "missing", "loc": ("body", "image"), "msg": "Field required",
                                       "input": None}])
    if len(images) > max_images:
        raise ClientError(422, f"{len(images)} images in one request; the limit is {max_images}")
    # Text over the bound is refused before validation (which runs here, on the event loop) can
    # split it; the other fields are still validated, so that the answer lists every error.
    long = long_text_fields(fields)
    where = "query" if _is_raw(ctype) else "body"
    errors = [{"type": "string_too_long", "loc": (where, k), "input": fields[k],
               "msg": f"text longer than {MAX_TEXT_CHARS} characters"} for k in long]
    try:
        params = params_cls.model_validate({k: v for k, v in fields.items() if k not in long})
    except ValidationError as e:
        errors += [{**err, "loc": (where, *err["loc"])} for err in e.errors(include_url=False, include_context=False)
                   if not (err["type"] == "missing" and err["loc"][:1] and err["loc"][0] in long)]
    if errors:
        raise RequestValidationError(errors) from None
    return params, images


async def admit_images(request: Request, images: list[bytes], target: imaging.Target, frames: int = 1,
                       forwards: int = 0) -> None:
    """Take from the budget shared by all requests the forward passes that scoring the faithfulness
    of the images' maps will run (`forwards` per image: refused with 413 naming the limit when they
    can never fit, before anything else is done), check every image's header in a worker thread
    (ImageError as decoding would raise it, naming the image when there are several), then take
    the pixels that decoding for `target` and drawing `frames` pictures will really hold (wait, or
    Busy -> 503); the middleware gives them back when the request's work has ended."""
    ctx = getattr(request.app.state, "ctx", None)
    if ctx is None or not images:
        return
    await admission_for(request.app).take_forwards(forwards * len(images))
    max_pixels = ctx.settings.max_pixels
    declared = getattr(request.state, "raw_type", None)

    def inspect_all() -> int:
        total = 0
        for i, data in enumerate(images):
            try:
                total += imaging.cost(data, max_pixels, target, frames)
            except imaging.ImageError as e:
                if isinstance(e, imaging.NotAnImage) and declared is not None and declared not in RAW_TYPES:
                    raise imaging.UnsupportedFormat(  # e.g. image/svg+xml: a type the service does not take
                        f"the body ({safe_text(declared, 80)!r}) is in no format the service decodes; send "
                        f"{', '.join(sorted(RAW_TYPES))} (or multipart/form-data or application/json)") from None
                if len(images) > 1:
                    raise type(e)(f"image {i}: {e}") from None
                raise
        return total

    # Headers only: for small uploads (the common 224 px JPEG) this is cheaper than a thread hop
    small = sum(len(d) for d in images) <= INLINE_INSPECT_BYTES
    pixels = inspect_all() if small else await run_in_threadpool(inspect_all)
    await admission_for(request.app).take_pixels(pixels)


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


async def _raw(request: Request) -> tuple[dict[str, Any], list[bytes]]:
    """The body is the image; the parameters come from the query string, each at most once."""
    fields: dict[str, Any] = {}
    items = request.query_params.multi_items()
    if len(items) > MAX_FIELDS:
        raise ClientError(400, f"more than {MAX_FIELDS} query parameters")
    for key, value in items:
        if key == "image":
            raise ClientError(422, "with a raw image body the image is the body: `image` cannot be a query parameter")
        if key in fields:
            raise ClientError(422, f"query parameter {safe_text(repr(key), 80)} is given more than once")
        fields[key] = value
    body = await request.body()  # bounded by the middleware's limit
    return fields, [body] if body else []
