"""The typed calls: every method of the service, once, over the `_send` of the sync or async client
(service/client/clients.py). A test (tests/test_client_registry.py) checks one call per registered method,
with the method's parameters."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from service.client.answers import Comparison, Maximized, _long_answer_bytes
from service.client.calls import ImageLike, Images, Progress, _Call, _faithful, _fields, encode_image


class _Methods:
    """Every method of the service, once; `_send` (sync or async) does the HTTP."""

    def _call(self, path: str, images: Images | None, fmt: str, **params: Any):
        many = isinstance(images, (list, tuple))
        given = list(images) if many else ([] if images is None else [images])
        fields = _fields(params, "json" if many else fmt)
        return self._send(_Call(path, fields, [encode_image(i) for i in given], fields["format"], many))

    # The methods that answer maps also take the faithfulness option (docs/faithfulness.md):
    # faithfulness=True, faithfulness_steps, removal ("blur" | "mean"), order ("most" | "least").
    # Picture answers (format png, jpeg or webp) are drawn with their longest side at most max_side.
    def rollout(self, images: Images, *, head_fusion: str | None = None, discard_ratio: float | None = None,
                start_layer: int | None = None, max_side: int | None = None, model: str | None = None,
                format: str = "json", **faithfulness: Any):
        return self._call("/rollout", images, format, head_fusion=head_fusion, discard_ratio=discard_ratio,
                          start_layer=start_layer, max_side=max_side, model=model, **_faithful(faithfulness))

    def grad_rollout(self, images: Images, *, category_id: int, head_fusion: str | None = None,
                     discard_ratio: float | None = None, start_layer: int | None = None, max_side: int | None = None,
                     model: str | None = None, format: str = "json", **faithfulness: Any):
        return self._call("/grad-rollout", images, format, category_id=category_id, head_fusion=head_fusion,
                          discard_ratio=discard_ratio, start_layer=start_layer, max_side=max_side, model=model,
                          **_faithful(faithfulness))

    def gae(self, images: Images, *, category_id: int, start_layer: int | None = None, max_side: int | None = None,
            model: str | None = None, format: str = "json", **faithfulness: Any):
        return self._call("/gae", images, format, category_id=category_id, start_layer=start_layer, max_side=max_side,
                          model=model, **_faithful(faithfulness))

    def attention(self, images: Images, *, head: int | str | None = None, model: str | None = None,
                  format: str = "json"):
        return self._call("/attention", images, format, head=head, model=model)

    def qk(self, images: Images, *, layer: int | None = None, head: int | None = None, channel: int | None = None,
           which: Literal["q", "k"] | None = None, max_side: int | None = None, model: str | None = None,
           format: str = "json"):
        return self._call("/qk", images, format, layer=layer, head=head, channel=channel, which=which,
                          max_side=max_side, model=model)

    def rollout_sweep(self, images: Images, *, discard_ratios: Sequence[float] | None = None,
                      head_fusion: str | None = None, start_layer: int | None = None, frame_ms: int | None = None,
                      max_side: int | None = None, model: str | None = None, format: str = "json",
                      **faithfulness: Any):
        return self._call("/rollout/sweep", images, format, discard_ratios=discard_ratios, head_fusion=head_fusion,
                          start_layer=start_layer, frame_ms=frame_ms, max_side=max_side, model=model,
                          **_faithful(faithfulness))

    def grad_rollout_sweep(self, images: Images, *, category_id: int, discard_ratios: Sequence[float] | None = None,
                           head_fusion: str | None = None, start_layer: int | None = None,
                           frame_ms: int | None = None, max_side: int | None = None, model: str | None = None,
                           format: str = "json", **faithfulness: Any):
        return self._call("/grad-rollout/sweep", images, format, category_id=category_id,
                          discard_ratios=discard_ratios, head_fusion=head_fusion, start_layer=start_layer,
                          frame_ms=frame_ms, max_side=max_side, model=model, **_faithful(faithfulness))

    def compare(self, image: ImageLike, settings: Sequence[dict[str, Any]], *, faithfulness_steps: int | None = None,
                removal: str | None = None, order: str | None = None, model: str | None = None):
        """POST /compare: settings [{"method": "rollout", "params": {...}}, ...] -> Comparison."""
        fields = _fields(dict(faithfulness_steps=faithfulness_steps, removal=removal, order=order, model=model), "json")
        fields = {k: v for k, v in fields.items() if k != "format"} | {"settings": json.dumps(list(settings))}
        return self._send(_Call("/compare", fields, [encode_image(image)], "json", False, form=True,
                                parse=Comparison.of))

    def predict(self, images: Images, *, model: str | None = None):
        return self._call("/predict", images, "json", model=model)

    def activation_max(self, image: ImageLike | None = None, *, target: str | None = None,
                       category_id: int | None = None, layer: int | None = None, head: int | None = None,
                       channel: int | None = None, param: str | None = None, copies: int | None = None,
                       noise: float | None = None, steps: int | None = None, lr: float | None = None,
                       seed: int | None = None, l2_weight: float | None = None, jitter: int | None = None,
                       tv_weight: float | None = None, model: str | None = None,
                       on_progress: Progress | None = None):
        """-> Maximized (its raw answer has `robustness`, `final_objective` and `start_objective`). With
        on_progress(step, objective), the progress streams as server-sent events; the last event is
        the robustness pass after the last step (its objective: the finished picture's)."""
        params = dict(target=target, category_id=category_id, layer=layer, head=head, channel=channel, param=param,
                      copies=copies, noise=noise, steps=steps, lr=lr, seed=seed, l2_weight=l2_weight, jitter=jitter,
                      tv_weight=tv_weight, model=model)
        fields = _fields(params, "json")
        call = _Call("/activation-max", fields, [] if image is None else [encode_image(image)], "json", False,
                     parse=Maximized.of)
        return self._send(call) if on_progress is None else self._send_stream(call, on_progress)

    def request(self, path: str, image: ImageLike | None = None, *, format: str = "json", to: str | Path | None = None,
                on_progress: Progress | None = None, **params: Any):
        """Any method by its path, for one image (or none): -> the answer's bytes as they came (JSON text,
        PNG, GIF), checked to be what was asked for. With `to`, the answer streams into a temporary
        file beside it, renamed to `to` only when complete and checked (-> the path). With
        `on_progress(step, objective)` (long work, GET /methods' kind "long"), the progress streams as
        server-sent events and the result event's JSON answer comes back as its bytes. The command
        line uses it; the typed calls above are nicer to program with."""
        fields = _fields(params, format)
        images = [] if image is None else [encode_image(image)]
        if on_progress is not None:
            if format != "json" or to is not None:
                raise ValueError("a streamed answer is JSON, returned: give neither another format nor `to`")
            call = _Call(path, fields, images, "json", False, parse=_long_answer_bytes)
            return self._send_stream(call, on_progress)
        call = _Call(path, fields, images, format, False, raw=True)
        return self._send(call, None if to is None else Path(to))

    @staticmethod
    def image(data: bytes) -> Image.Image:
        """PNG (or GIF) bytes of an answer -> PIL image."""
        return Image.open(io.BytesIO(data))

