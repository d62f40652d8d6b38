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

# The longest side of a picture answer in each format, in pixels: what its encoder writes, libwebp
# 16383, libjpeg 65500 (JPEG_MAX_DIMENSION), GIF's 16-bit sizes 65535 (measured at each limit and
# one past it by tests/test_hostile3_edges.py). PNG allows 2^31 - 1, but libpng's readers refuse
# more than 1,000,000 a side by default (PNG_USER_WIDTH_MAX), and a 40,000,000 x 1 overlay took
# 20 s in one row no deadline check could cut (1.6 GB): PNG and APNG stop at 1,000,000 too.
# A picture answer is drawn no larger (service/methods/base.py, Method.canvas).
MAX_SIDES = {
    "png": 1_000_000,
    "apng": 1_000_000,
    "gif": 65535,
    "jpeg": 65500,
    "webp": 16383,
}
