"""Decode JPEG uploads on the model's device, batched, and resize them there (`--decode-on-device`).

On a GPU host the CPU work around the model is the limit, and decoding is most of it for large
photographs: nvJPEG (torchvision.io.decode_jpeg with device="cuda", one call for the whole batch)
takes it off the CPU. The same functions run on the CPU (libjpeg-turbo), which is how the tests
check them against the CPU path (service/imaging.py):

    bytes (B uploads) -> decode_jpeg -> B x (3, h_i, w_i) uint8 on the device
      -> per image: interpolate to (H, W) with antialiasing (the model's interpolation) -> round
      -> (B, H, W, 3) uint8 on the device, as Engine.run takes it

Only JPEGs whose EXIF orientation is absent or upright, answered as JSON, take this path (the
decode stage leaves them encoded: imaging.Target.keep_jpeg); everything else is decoded on the
CPU as usual. What differs from the CPU path:
the decoder's IDCT and upsampling, and torch's antialiased resize instead of Pillow's; the bound
is stated in docs/performance.md and tested (tests/test_device_decode.py).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from service import imaging

log = logging.getLogger("service.device_decode")

# Pillow's resampling filter -> torch's interpolate mode (antialiased); others fall back to bicubic
_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}


def decode_resize(blobs: Sequence[bytes], size: tuple[int, int], device: torch.device,
                  interpolation: str = "bicubic") -> torch.Tensor:
    """JPEG bytes -> (B, H, W, 3) uint8 on `device`, each image squash-resized to size (H, W).

    A JPEG the decoder refuses raises ImageError (422) for the batch, in the CPU path's words
    (imaging.library_words: the decoder's reason, never its source path and line); the pool then
    retries its items one by one, so that only the bad upload fails, and the API names it among
    several (service/api/explain.py)."""
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 marks its decoders deprecated (TorchCodec)
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except Exception as e:  # noqa: BLE001 - whatever the decoder raises, the upload is at fault
        log.info("the device decoder refused a JPEG: %s", e)
        raise imaging.ImageError(f"the image is truncated or corrupt: {imaging.library_words(e)}") from None
    mode = _MODES.get(interpolation, "bicubic")
    out = torch.empty((len(images), *size, 3), dtype=torch.uint8, device=device)
    for i, img in enumerate(images):  # (3, h, w) uint8, sizes differ
        x = img[None].float()
        if tuple(x.shape[-2:]) != tuple(size):
            kw = {"antialias": True, "align_corners": False} if mode != "nearest" else {}
            x = F.interpolate(x, size=size, mode=mode, **kw)
        out[i] = x[0].round_().clamp_(0, 255).permute(1, 2, 0).to(torch.uint8)
    return out
