"""Request bodies -> (validated parameters, image bytes), for multipart and for JSON.

multipart/form-data: one or more file parts named `image`, the parameters as form fields.
application/json: {"image": "<base64>" or ["<base64>", ...], ...parameters}.
Every way a body can be wrong ends here as a ClientError with the status to answer.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

P = TypeVar("P", bound=BaseModel)


class ClientError(ValueError):
    """A malformed request: `status` is what the API answers (400, 413, 415 or 422)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


async def read_request(
    request: Request, params_cls: type[P], max_images: int, image_required: bool = True
) -> tuple[P, list[bytes]]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        fields, images = await _multipart(request, max_images)
    elif ctype == "application/json":
        fields, images = await _json(request)
    else:
        raise ClientError(415, f"send multipart/form-data or application/json, not {ctype or 'no content type'!r}")
    if not images and image_required:
        raise RequestValidationError([{"type": "missing", "loc": ("body", "image"), "msg": "Field required", "input": None}])
    if len(images) > max_images:
        raise ClientError(422, f"{len(images)} images in one request; the limit is {max_images}")
    try:
        return params_cls.model_validate(fields), images
    except ValidationError as e:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False, include_context=False)]
        ) from None


async def _multipart(request: Request, max_images: int) -> tuple[dict[str, Any], list[bytes]]:
    try:
        form = await request.form(max_files=max_images + 1, max_fields=64)
    except (MultiPartException, ValueError) as e:  # the parser's complaints are the client's problem
        raise ClientError(400, f"malformed multipart body: {e}") from None
    try:
        fields: dict[str, Any] = {}
        images: list[bytes] = []
        for key, value in form.multi_items():
            if key == "image":
                if not isinstance(value, UploadFile):
                    raise ClientError(422, "`image` must be a file part (curl -F image=@file.png), not a text field")
                images.append(await value.read())
            elif key in fields:
                raise ClientError(422, f"field {key!r} is given more than once")
            else:
                fields[key] = value if isinstance(value, str) else "<file>"
        return fields, images
    finally:
        await form.close()


async def _json(request: Request) -> tuple[dict[str, Any], list[bytes]]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ClientError(400, f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise ClientError(422, "the JSON body must be an object with an `image` member")
    raw = body.pop("image", None)
    encoded = raw if isinstance(raw, list) else [] if raw is None else [raw]
    images = []
    for i, item in enumerate(encoded):
        if not isinstance(item, str):
            raise ClientError(422, f"image[{i}] must be a base64 string")
        try:
            images.append(base64.b64decode(item.split(",", 1)[-1] if item.startswith("data:") else item, validate=True))
        except (binascii.Error, ValueError):
            raise ClientError(422, f"image[{i}] is not valid base64") from None
    return body, images
