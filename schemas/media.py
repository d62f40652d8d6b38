"""The answer formats a method may offer (its `format` parameter) and the media type of each: the
service's Content-Type for the answer, and what the client expects it to be."""

from __future__ import annotations

MEDIA_TYPES = {
    "json": "application/json",
    "png": "image/png",
    "apng": "image/png",  # an animated PNG is a PNG
    "gif": "image/gif",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
}
