"""--decode-on-device: JPEGs decoded and resized by torch on the model's device, batched
(service/engine/device_decode.py). Here the device is the CPU: the same functions as on CUDA,
checked against the CPU path (Pillow) within a stated bound: at most 3 grey levels anywhere and
0.5 on average at the input size, and a mask within 0.05 of the CPU path's."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service import imaging
from service.config import SHAPES_VIT
from service.engine.device_decode import decode_resize
from tests.conftest import jpeg_bytes, photo, png_bytes, smooth_image
from tests.server import running_server


@pytest.mark.parametrize("size", [(224, 224), (640, 480), (1920, 1280), (300, 900)])
@pytest.mark.parametrize("interp, resample", [("bicubic", Image.Resampling.BICUBIC),
                                              ("bilinear", Image.Resampling.BILINEAR)])
def test_device_decode_matches_the_cpu_path(size, interp, resample):
    blobs = [jpeg_bytes(photo(size, seed=s)) for s in range(2)]
    got = decode_resize(blobs, (224, 224), torch.device("cpu"), interp)
    assert got.shape == (2, 224, 224, 3) and got.dtype == torch.uint8
    for i, data in enumerate(blobs):
        cpu = imaging.prepare(data, 10**9, imaging.Target((224, 224), resample)).pixels.astype(np.int16)
        diff = np.abs(got[i].numpy().astype(np.int16) - cpu)
        assert diff.max() <= 3 and diff.mean() <= 0.5, (diff.max(), diff.mean())


def test_a_corrupt_jpeg_is_an_image_error():
    with pytest.raises(imaging.ImageError):
        decode_resize([b"\xff\xd8\xff\xe0 definitely not a jpeg \xff\xd9"], (224, 224), torch.device("cpu"))


def test_the_decoders_refusal_is_in_the_services_words():
    """Headers that Pillow opens, no scan data: torchvision refuses it citing its own source file
    (decode_jpeg.cpp:171); the client is told libjpeg's reason in the CPU path's words, nothing more."""
    good = jpeg_bytes(smooth_image(1))
    no_scan = good[: good.index(b"\xff\xda")] + b"\xff\xd9"
    with pytest.raises(imaging.ImageError) as e:
        decode_resize([good, no_scan], (224, 224), torch.device("cpu"))
    text = str(e.value)
    assert text.startswith("the image is truncated or corrupt: ") and "SOS" in text, text
    assert ".cpp" not in text and "/" not in text and "decode_jpeg" not in text, text


@pytest.fixture(scope="module")
def servers():
    args = ["--model", f"demo=local-dir:{SHAPES_VIT}", "--max-delay-ms", "20"]
    with running_server([*args, "--decode-on-device"]) as on, running_server(args) as off:
        yield on.url, off.url


def _mask(url, data, **params):
    r = httpx.post(f"{url}/rollout", content=data, headers={"Content-Type": "image/jpeg"},
                   params={"format": "json", **params}, timeout=60)
    assert r.status_code == 200, r.text
    return np.array(r.json()["mask"])


def test_served_maps_stay_within_the_bound_of_the_cpu_path(servers):
    on, off = servers
    for size in ((224, 224), (1920, 1280)):
        data = jpeg_bytes(photo(size, seed=5))
        assert np.abs(_mask(on, data) - _mask(off, data)).max() < 0.05


def test_a_mixed_batch_and_what_stays_on_the_cpu_path(servers):
    on, off = servers
    turned = Image.Exif()
    turned[0x0112] = 6
    blobs = [jpeg_bytes(photo((640, 480), seed=6)), png_bytes(smooth_image(6)),
             jpeg_bytes(photo((640, 480), seed=7), exif=turned)]
    files = [("image", (f"{i}", b, "application/octet-stream")) for i, b in enumerate(blobs)]
    a = httpx.post(f"{on}/rollout", files=files, data={"format": "json"}, timeout=60).json()["results"]
    b = httpx.post(f"{off}/rollout", files=files, data={"format": "json"}, timeout=60).json()["results"]
    np.testing.assert_array_equal(a[1]["mask"], b[1]["mask"])  # a PNG: decoded on the CPU as always
    np.testing.assert_array_equal(a[2]["mask"], b[2]["mask"])  # turned by EXIF: the CPU path
    assert np.abs(np.array(a[0]["mask"]) - np.array(b[0]["mask"])).max() < 0.05


def test_a_truncated_jpeg_is_refused_not_padded(servers):
    on, _ = servers
    data = jpeg_bytes(photo((800, 600)))
    r = httpx.post(f"{on}/rollout", content=data[: len(data) // 2], headers={"Content-Type": "image/jpeg"},
                   params={"format": "json"}, timeout=60)
    assert r.status_code == 422 and "truncated" in r.json()["detail"]


def test_pictures_are_drawn_from_the_cpu_decode(servers):
    on, off = servers
    data = jpeg_bytes(photo((900, 600), seed=8))
    a = httpx.post(f"{on}/rollout", content=data, headers={"Content-Type": "image/jpeg"}, timeout=60)
    b = httpx.post(f"{off}/rollout", content=data, headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert a.content == b.content  # a canvas is needed: the upload took the CPU path
    assert Image.open(io.BytesIO(a.content)).size == (900, 600)


def test_the_decode_stage_leaves_only_upright_whole_jpegs_for_json_answers_encoded():
    keep = imaging.Target((224, 224), Image.Resampling.BICUBIC, keep_jpeg=True)
    data = jpeg_bytes(photo((1600, 1200), seed=9))
    d = imaging.prepare(data, 10**9, keep)
    assert d.pixels is None and d.encoded == data and d.decoded_size == (1600, 1200)
    assert imaging.cost(data, 10**9, keep) == 1600 * 1200  # decoded whole, on the device
    turned = Image.Exif()
    turned[0x0112] = 8
    for other in (jpeg_bytes(photo((640, 480)), exif=turned), png_bytes(smooth_image(1))):
        assert imaging.prepare(other, 10**9, keep).pixels is not None
    drawn = imaging.Target((224, 224), Image.Resampling.BICUBIC, canvas=1024, keep_jpeg=True)
    assert imaging.prepare(data, 10**9, drawn).pixels is not None
    with pytest.raises(imaging.ImageError, match="truncated"):
        imaging.prepare(data[:-5000], 10**9, keep)
