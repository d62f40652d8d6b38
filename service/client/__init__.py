"""A Python client of the service, on httpx: one call per method, sync (`Client`) and async (`AsyncClient`).

    from service.client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as c:
        r = c.rollout("cat.png", head_fusion="mean")          # Explanation: r.mask (gh, gw) numpy, r.predictions
        png = c.rollout("cat.png", format="png")              # bytes; Client.image(png) -> PIL image
        many = c.grad_rollout(["cat.png", "dog.png"], category_id=243)   # one Explanation per image
        x = c.activation_max(category_id=281, steps=50, on_progress=print)
        r = c.gae("cat.png", category_id=281, faithfulness=True)   # r.faithfulness: curves and areas
        cmp = c.compare("cat.png", [{"method": "rollout"}, {"method": "gae", "params": {"category_id": 281}}])
        jpg = c.rollout("photo.jpg", format="jpeg", max_side=640)   # a picture answer, at most 640 px

Images may be paths, bytes (an encoded image), PIL images or numpy arrays (H, W[, 3]; uint8, or
floats in [0, 1]). Parameters left out take the service's defaults (GET /methods lists them).
One image goes as a raw body (the image's own content type, the parameters in the query string),
several as multipart.
503 answers are retried with backoff, honouring Retry-After (capped at `max_retry_after`); every
other error raises ServiceError with the service's `detail`. An answer is taken only when its
status, content type and body are what was asked for (a PNG or GIF whole from signature to end
marker, JSON that parses, events that parse), no larger than `max_answer_bytes` and whole within
the call's `deadline` (retries included); else AnswerError (a ServiceError, 502 or 504).

The package, by job: calls.py (what a call sends), methods.py (the typed calls, one per method),
answers.py (the errors, the answers' types and their checks), events.py (server-sent events),
exchange.py (the send-and-retry loop's decisions, shared by both clients), deadline.py and transport.py
(the call's one deadline, kept by every read and write of the sync client's connections), clients.py
(Client and AsyncClient: the I/O).
"""

from schemas.media import MEDIA_TYPES
from service.client.answers import (
    ANSWER_KEYS,
    MAX_ANSWER_BYTES,
    MAX_ERROR_BYTES,
    SIGNATURES,
    AnswerError,
    Comparison,
    Explanation,
    Maximized,
    ServiceError,
    picture_of,
)
from service.client.calls import FAITHFULNESS_OPTIONS, ImageLike, Images, Progress, encode_image
from service.client.clients import AsyncClient, Client
from service.client.deadline import DEADLINE_S
from service.client.exchange import MAX_RETRY_AFTER_S
from service.client.methods import _Methods

__all__ = [
    "ANSWER_KEYS", "DEADLINE_S", "FAITHFULNESS_OPTIONS", "MAX_ANSWER_BYTES", "MAX_ERROR_BYTES", "MAX_RETRY_AFTER_S",
    "MEDIA_TYPES", "SIGNATURES", "AnswerError", "AsyncClient", "Client", "Comparison", "Explanation", "ImageLike",
    "Images", "Maximized", "Progress", "ServiceError", "_Methods", "encode_image", "picture_of",
]
