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

# The longest side each format's encoder writes, in pixels: libwebp 16383, libjpeg 65500
# (JPEG_MAX_DIMENSION), GIF's 16-bit sizes 65535; PNG and APNG, 2^31 - 1 (the PNG specification).
# A picture answer is drawn no larger (service/methods/base.py, Method.canvas); measured at each limit and one past
# it by tests/test_hostile3_edges.py.
MAX_SIDES = {
    "png": 2**31 - 1,
    "apng": 2**31 - 1,
    "gif": 65535,
    "jpeg": 65500,
    "webp": 16383,
}
