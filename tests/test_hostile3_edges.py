"""Hostile clients, round three (issue 24), the new surfaces' edges: picture answers of extreme
shapes within every encoder's own limits, any image/* body answered from its bytes (HEIC and AVIF
decoded), library errors in the service's own words, the --workers metrics directory bounded, and
the command lines' deadline said in --help. (The workers' directory under real kills:
tests/test_workers.py; the device decoder's own words: tests/test_device_decode.py.)
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import threading
import time

import numpy as np
import pillow_heif
import pytest
from PIL import Image
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from schemas.requests import MAX_SIDE
from service import imaging, metrics
from service.cli import compare as cli_compare
from service.cli import explain as cli_explain
from service.config import SHAPES_VIT
from service.methods import REGISTRY
from tests.conftest import jpeg_bytes, png_bytes, smooth_image
from tests.server import running_server

MAX_PIXELS = 300_000  # above every thin upload here (70000 x 2), below a 600 x 600 HEIC


@pytest.fixture(scope="module")
def server():
    args = ["--model", f"demo=local-dir:{SHAPES_VIT}", "--max-delay-ms", "5", "--max-pixels", str(MAX_PIXELS),
            "--decode-on-device"]
    with running_server(args) as s:
        yield s.url


def thin(w: int, h: int) -> bytes:
    """A w x h PNG (a few KB however long): a gradient, so that the map has something to draw over."""
    row = np.linspace(0, 255, w, dtype=np.float32).astype(np.uint8)[None, :].repeat(h, 0)
    col = np.linspace(0, 255, h, dtype=np.float32).astype(np.uint8)[:, None].repeat(w, 1)
    arr = np.stack([row, col, 255 - row], axis=-1)
    return png_bytes(Image.fromarray(arr))


def picture(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# -- every encoder at its limit -------------------------------------------------------------------
def _encode(fmt: str, arr: np.ndarray) -> bytes:
    """As the service encodes each format: the overlays' encoder, the sweeps' animated GIF/APNG."""
    if fmt in ("png", "jpeg", "webp"):
        return imaging.encode(arr, fmt)
    frames = [Image.fromarray(arr), Image.fromarray(255 - arr)]
    if fmt == "gif":
        frames = [imaging.to_palette(f) for f in frames]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF" if fmt == "gif" else "PNG", save_all=True, append_images=frames[1:],
                   duration=100, loop=0)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["webp", "jpeg", "gif"])
def test_each_encoder_writes_its_limit_and_not_one_pixel_more(fmt):
    """imaging.MAX_SIDES is each encoder's real limit: a picture of that side in either direction
    is written and reads back; one pixel more fails in the encoder itself."""
    limit = imaging.MAX_SIDES[fmt]
    for w, h in ((limit, 2), (2, limit)):
        arr = np.zeros((h, w, 3), np.uint8)
        arr[..., 0] = np.arange(w, dtype=np.uint32)[None, :] % 256
        assert picture(_encode(fmt, arr)).size == (w, h)
    with pytest.raises((ValueError, OSError, OverflowError)):
        _encode(fmt, np.zeros((2, limit + 1, 3), np.uint8))


@pytest.mark.parametrize("fmt", ["png", "apng"])
def test_png_stops_where_libpngs_readers_do(fmt):
    """PNG's own sides are 31-bit; the service stops at libpng's default reader limit, 1,000,000
    (schemas/media.py says why), and writes that much."""
    assert imaging.MAX_SIDES[fmt] == 1_000_000
    arr = np.zeros((2, imaging.MAX_SIDES[fmt], 3), np.uint8)
    arr[0, :, 1] = 200
    got = picture(_encode(fmt, arr))
    assert got.size == (imaging.MAX_SIDES[fmt], 2) and np.asarray(got.convert("RGB"))[0, -1, 1] == 200


def test_a_canvas_row_is_never_longer_than_the_png_limit():
    """The thinnest upload the default pixel limit lets through, 40,000,000 x 1, drawn at max_side=0:
    its canvas row is at most 1,000,000 px, each a chunk the deadline check comes between."""
    for method in PICTURE_METHODS:
        for fmt in [f for f in method.formats if f != "json"]:
            canvas = method.canvas(_params(method, format=fmt, max_side=0))
            assert max(imaging.canvas_size((40_000_000, 1), canvas)) <= 1_000_000


def _params(method, **fields):
    """method's Params with `fields`, every required field filled with 0."""
    need = {n: 0 for n, f in method.Params.model_fields.items() if f.is_required()}
    return method.Params.model_validate({**need, **fields})


PICTURE_METHODS = [m for m in REGISTRY.values() if "max_side" in m.Params.model_fields]


@pytest.mark.parametrize("method", PICTURE_METHODS, ids=lambda m: m.name)
def test_every_picture_method_draws_within_its_formats_limit(method):
    """For every method with max_side and each picture format it offers, whatever max_side within
    its bounds: the canvas of the thinnest uploads fits the format's encoder."""
    for fmt in [f for f in method.formats if f != "json"]:
        limit = imaging.MAX_SIDES[fmt]
        for side in {0, MAX_SIDE, min(limit, MAX_SIDE), 1024, 1}:
            canvas = method.canvas(_params(method, format=fmt, max_side=side))
            for size in ((70000, 2), (2, 70000), (65536, 2), (16384, 2), (limit + 1, 1)):
                w, h = imaging.canvas_size(size, canvas)
                assert max(w, h) <= limit and min(w, h) >= 1, (fmt, side, size, (w, h))
                if side:
                    assert max(w, h) <= side
            if side == 0 or side >= 1000:  # small uploads are kept as they are, never enlarged
                assert imaging.canvas_size((1000, 10), canvas) == (1000, 10)


def test_the_montage_fits_its_format_however_many_blocks():
    """A model of 72 x 72 blocks over a thin upload: 224 px tiles would make a sheet 16412 px wide,
    past WebP's 16383; the tiles shrink so that the sheet fits, and the WebP is written."""
    img = Image.fromarray(np.full((2, 7000, 3), 120, np.uint8))
    maps = np.random.default_rng(0).random((72 * 72, 2, 2)).astype(np.float32)
    sheet = imaging.montage(img, maps, max_side=imaging.MAX_SIDES["webp"])
    assert max(sheet.shape[:2]) <= imaging.MAX_SIDES["webp"]
    assert picture(imaging.encode(sheet, "webp")).size == (sheet.shape[1], sheet.shape[0])
    normal = imaging.montage(img, maps[:12], max_side=imaging.MAX_SIDES["webp"])
    assert normal.shape[1] == 4 * 224 + 3 * imaging.GAP  # a usual model keeps its 224 px tiles


# -- picture answers of extreme shapes, through the API -----------------------------------------
THIN_CASES = [  # path, params, upload (w, h), the picture's (w, h)
    ("/rollout", {"format": "webp", "max_side": 0}, (16384, 2), (16383, 2)),
    ("/rollout", {"format": "webp", "max_side": 16384}, (20000, 2), (16383, 2)),
    ("/grad-rollout", {"format": "webp", "max_side": 16384, "category_id": 1, "faithfulness": "true",
                       "faithfulness_steps": 2}, (16384, 2), (16383, 2)),
    ("/gae", {"format": "jpeg", "max_side": 0, "category_id": 2}, (65536, 2), (65500, 2)),
    ("/rollout", {"format": "jpeg", "max_side": 0}, (2, 65536), (2, 65500)),
    ("/rollout", {"format": "png", "max_side": 0}, (70000, 2), (70000, 2)),
    ("/qk", {"format": "png", "max_side": 0}, (70000, 2), (70000, 2)),
    ("/rollout/sweep", {"format": "gif", "max_side": 0, "discard_ratios": "0,0.5"}, (70000, 2), (65535, 2)),
    ("/grad-rollout/sweep", {"format": "gif", "max_side": 16384, "discard_ratios": "0.9", "category_id": 0},
     (2, 70000), (1, 16384)),
    ("/grad-rollout/sweep", {"format": "apng", "max_side": 0, "discard_ratios": "0,0.9", "category_id": 0},
     (70000, 2), (70000, 2)),
]


@pytest.mark.parametrize("path, params, size, want", THIN_CASES,
                         ids=[f"{p}-{q['format']}-{s[0]}x{s[1]}" for p, q, s, _ in THIN_CASES])
def test_thin_uploads_are_answered_within_each_encoders_limit(client, path, params, size, want):
    data = thin(*size)
    raw = client.post(path, content=data, headers={"Content-Type": "image/png"},
                      params={k: str(v) for k, v in params.items()})
    assert raw.status_code == 200, raw.text
    assert picture(raw.content).size == want
    form = client.post(path, files={"image": ("x.png", data, "image/png")}, data={k: str(v) for k, v in params.items()})
    assert form.status_code == 200 and form.content == raw.content


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_the_attention_montage_of_a_thin_upload_is_drawn_in_every_format(client, fmt):
    r = client.post("/attention", files={"image": ("x.png", thin(70000, 2), "image/png")}, data={"format": fmt})
    assert r.status_code == 200, r.text
    assert max(picture(r.content).size) <= imaging.MAX_SIDES[fmt]


def test_the_client_gets_a_webp_of_the_widest_side_it_holds(server, tmp_path):
    from service.client import Client

    path = tmp_path / "thin.png"
    path.write_bytes(thin(16384, 2))
    with Client(server) as c:
        r = c.rollout(path, format="webp", max_side=0)
    assert isinstance(r, bytes) and picture(r).size == (16383, 2)


# -- any image/* body -----------------------------------------------------------------------------
LYING_TYPES = ["image/jpg", "image/pjpeg", "image/heic", "image/avif", "image/svg+xml", "image/x-icon",
               "image/x-png", "image/vnd.anything", "IMAGE/JPEG"]


@pytest.mark.parametrize("ctype", LYING_TYPES)
def test_any_image_type_is_explained_from_its_bytes_with_or_without_a_query(client, ctype):
    data = jpeg_bytes(smooth_image(11))
    plain = client.post("/rollout", content=data, headers={"Content-Type": ctype})
    queried = client.post("/rollout", content=data, headers={"Content-Type": ctype}, params={"discard_ratio": "0.9"})
    assert plain.status_code == queried.status_code == 200, (plain.text, queried.text)
    assert plain.content == queried.content  # the query's parameter is the default: the same picture
    as_json = client.post("/rollout", content=data, headers={"Content-Type": ctype}, params={"format": "json"})
    assert as_json.status_code == 200 and len(as_json.json()["mask"]) > 0


ICO = (lambda b: (Image.new("RGB", (16, 16), (1, 2, 3)).save(b, format="ICO"), b.getvalue())[1])(io.BytesIO())
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'


@pytest.mark.parametrize("ctype, data", [("image/svg+xml", SVG), ("image/x-icon", ICO),
                                         ("image/vnd.anything", b"\x00\x01\x02 no image here" * 10)])
def test_a_type_not_taken_with_bytes_not_decodable_is_415_either_way(client, ctype, data):
    answers = [client.post("/rollout", content=data, headers={"Content-Type": ctype}, params=q)
               for q in ({}, {"format": "json"}, {"discard_ratio": "0.5"})]
    assert {a.status_code for a in answers} == {415}, [a.text for a in answers]
    for a in answers:  # the types taken (or, for a format PIL knows, the formats taken)
        detail = a.json()["detail"].upper()
        assert "JPEG" in detail and "PNG" in detail and "HEIF" in detail, detail


@pytest.mark.parametrize("ctype", ["image/jpeg", "image/heic", "image/avif"])
def test_undecodable_bytes_declared_as_a_type_taken_stay_422(client, ctype):
    for q in ({}, {"format": "json"}):
        r = client.post("/rollout", content=b"not an image", headers={"Content-Type": ctype}, params=q)
        assert r.status_code == 422 and "not a decodable image" in r.json()["detail"]


def _heif(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, ctype", [("HEIF", "image/heic"), ("AVIF", "image/avif")])
def test_heic_and_avif_are_explained_through_every_body(client, fmt, ctype):
    """The mask of a HEIC (AVIF) is the mask of its pixels as the library decodes them, sent as PNG;
    the same through a raw body, a multipart form and JSON."""
    data = _heif(smooth_image(12, (320, 240)), fmt)
    want = client.post("/rollout", files={"image": ("x.png", png_bytes(picture(data).convert("RGB")), "image/png")},
                       data={"format": "json"}).json()["mask"]
    raw = client.post("/rollout", content=data, headers={"Content-Type": ctype}, params={"format": "json"})
    form = client.post("/rollout", files={"image": ("x", data, "application/octet-stream")}, data={"format": "json"})
    body = client.post("/rollout", json={"image": base64.b64encode(data).decode(), "format": "json"})
    for r in (raw, form, body):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["mask"], want, atol=1e-6)
    pic = client.post("/rollout", content=data, headers={"Content-Type": ctype}, params={"max_side": 0})
    assert pic.status_code == 200 and picture(pic.content).size == (320, 240)


def test_the_client_and_the_cli_send_heic_and_avif(server, tmp_path):
    """The client sends a HEIC (AVIF) as a raw body of its type; the CLI takes them from a folder,
    through the server and in process; every door answers the mask of the decoded pixels."""
    from service.client import Client
    from service.client import calls as client_module

    d = tmp_path / "phone"
    d.mkdir()
    for fmt, ext, ctype in (("HEIF", ".heic", "image/heic"), ("AVIF", ".avif", "image/avif")):
        data = _heif(smooth_image(13, (200, 150)), fmt)
        (d / f"x{ext[1:]}{ext}").write_bytes(data)
        assert client_module._raw_type(data) == ctype
    with Client(server) as c:
        want = {p.name: c.rollout(png_bytes(picture(p.read_bytes()).convert("RGB"))).mask for p in d.iterdir()}
        for p in d.iterdir():
            np.testing.assert_allclose(c.rollout(p).mask, want[p.name], atol=1e-6)
    for extra in (["--server", server], ["--model", f"demo=local-dir:{SHAPES_VIT}"]):
        out = tmp_path / f"out{len(extra[1])}"
        assert cli_explain.main([str(d), *extra, "-o", str(out), "--format", "json", "--quiet"]) == 0
        for p in d.iterdir():
            got = json.loads((out / f"{p.stem}.json").read_text())["mask"]
            np.testing.assert_allclose(got, want[p.name], atol=1e-4)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_a_heic_or_avif_over_the_pixel_limit_is_refused_before_decoding(client, fmt, monkeypatch):
    data = _heif(Image.new("RGB", (600, 600), (9, 9, 9)), fmt)
    r = client.post("/rollout", content=data, headers={"Content-Type": "image/heic"})
    assert r.status_code == 413 and str(MAX_PIXELS) in r.json()["detail"]
    decoded = []  # and in this process: the check reads the header only, nothing is decoded
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self) or None)
    with pytest.raises(imaging.ImageTooLarge):
        imaging.decode(data, MAX_PIXELS)
    assert not decoded and pillow_heif.__version__


# -- no library's words reach a client ------------------------------------------------------------
LEAKS = re.compile(r"\.(?:cpp|cc|cxx|c|h|hpp|cu|py|pyx)\b(?::\d+)?|Traceback|line \d+|site-packages|/__w/|"
                   r"(?:^|\s)/\w+/", re.IGNORECASE)


def _no_scan_jpeg(seed: int = 0) -> bytes:
    """Valid headers, no scan: Pillow opens it, torchvision's decoder fails in decode_jpeg.cpp."""
    data = jpeg_bytes(smooth_image(seed))
    return data[: data.index(b"\xff\xda")] + b"\xff\xd9"


def _bad_uploads() -> dict[str, bytes]:
    good = jpeg_bytes(smooth_image(3))
    png = png_bytes(smooth_image(4))
    heic = _heif(smooth_image(5, (128, 96)), "HEIF")
    avif = _heif(smooth_image(5, (128, 96)), "AVIF")
    return {
        "no-scan-jpeg": _no_scan_jpeg(),
        "cut-jpeg": good[: len(good) // 2],
        "cut-png": png[: len(png) // 2],
        "png-bad-crc": png[:40] + bytes([png[40] ^ 0xFF]) + png[41:],
        "cut-heic": heic[: len(heic) // 2],
        "heic-garbled": heic[:200] + bytes(len(heic) - 200),
        "cut-avif": avif[: len(avif) // 2],
        "avif-garbled": avif[:120] + bytes(len(avif) - 120),
        "ico": ICO,
        "svg": SVG,
    }


def test_no_client_error_carries_a_source_path_a_line_or_a_trace(client):
    """Every bad upload above, alone and second of three, raw and multipart, JSON and picture
    answers (the device decoder and the CPU path): 4xx, and details in the service's words."""
    good = jpeg_bytes(smooth_image(6))
    seen = 0
    for name, data in _bad_uploads().items():
        for fmt in ("json", "png"):
            answers = [
                client.post("/rollout", content=data, headers={"Content-Type": "image/jpeg"}, params={"format": fmt}),
                client.post("/rollout", data={"format": fmt},
                            files=[("image", ("x", d, "application/octet-stream")) for d in (good, data, good)]),
            ]
            for r in answers:
                assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
                detail = json.dumps(r.json()["detail"])
                assert not LEAKS.search(detail), (name, detail)
                seen += 1
            assert answers[1].json()["detail"].startswith("image 1: "), (name, answers[1].text)
    assert seen == 4 * len(_bad_uploads())


def test_the_device_decoders_refusal_names_the_image_and_says_why(client):
    """A JPEG with no scan data among several, answered as JSON (decoded by torchvision): the
    image is named as the CPU path names it, the reason is libjpeg's, and nothing of its source."""
    good = jpeg_bytes(smooth_image(7))
    files = [("image", (str(i), d, "image/jpeg")) for i, d in enumerate((good, good, _no_scan_jpeg(1)))]
    r = client.post("/rollout", files=files, data={"format": "json"})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith("image 2: the image is truncated or corrupt") and "SOS" in detail, detail
    assert ".cpp" not in detail and "/" not in detail.split(":", 1)[1]


@pytest.mark.parametrize("text, want", [
    ("decode_jpeg, /__w/vision/torchvision/csrc/io/image/cpu/decode_jpeg.cpp:171, Invalid JPEG file structure: "
     "missing SOS marker", "Invalid JPEG file structure: missing SOS marker"),
    ("broken data stream when reading image file", "broken data stream when reading image file"),
    ("Traceback (most recent call last):\n  File \"x.py\", line 3, in <module>", "RuntimeError"),
    ("failed at /usr/lib/x86_64-linux-gnu/libheif.so.1", "RuntimeError"),
    ("libheif.c:99: bad box\nsecond line /etc/passwd", "bad box"),
])
def test_library_words_keep_the_reason_and_drop_the_source(text, want):
    assert imaging.library_words(RuntimeError(text)) == want


# -- the --workers metrics directory --------------------------------------------------------------
def _write(path: str, values: dict[str, float]) -> None:
    d = MmapedDict(path)
    for key, value in values.items():
        d.write_value(key, value, 0.0)
    d.close()


def _scrape(directory: str, monkeypatch) -> str:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", directory)
    return metrics.Metrics().render().decode()


def test_a_dead_processes_files_are_merged_into_the_totals_and_removed(tmp_path, monkeypatch):
    """Three processes' counter, histogram and live gauge files; retiring two of them, one after the
    other, leaves the scrape's counter and histogram totals as they were, drops their gauges,
    and leaves one `dead` file per type instead of theirs."""
    d = str(tmp_path)
    req = mmap_key("vit_requests", "vit_requests_total", ["endpoint", "status"], ["/x", "200"], "HTTP requests")
    bucket = mmap_key("vit_batch_size", "vit_batch_size_bucket", ["model", "le"], ["m", "4.0"], "images per batch")
    total = mmap_key("vit_batch_size", "vit_batch_size_sum", ["model"], ["m"], "images per batch")
    depth = mmap_key("vit_queue_depth", "vit_queue_depth", ["model"], ["m"], "images waiting")
    for pid, n in ((101, 3.0), (202, 5.0), (303, 7.0)):
        _write(f"{d}/counter_{pid}.db", {req: n})
        _write(f"{d}/histogram_{pid}.db", {bucket: n, total: 2 * n})
        _write(f"{d}/gauge_livesum_{pid}.db", {depth: 1.0})
    before = _scrape(d, monkeypatch)
    assert 'vit_requests_total{endpoint="/x",status="200"} 15.0' in before
    assert 'vit_queue_depth{model="m"} 3.0' in before
    for pid in (101, 202):
        metrics.retire(pid, d)
        metrics.retire(pid, d)  # twice: nothing more happens
    after = _scrape(d, monkeypatch)
    for line in ('vit_requests_total{endpoint="/x",status="200"} 15.0', 'vit_batch_size_sum{model="m"} 30.0',
                 'vit_batch_size_bucket{le="4.0",model="m"} 15.0', 'vit_batch_size_count{model="m"} 15.0',
                 'vit_queue_depth{model="m"} 1.0'):
        assert line in after, (line, after)
    assert sorted(os.listdir(d)) == [".lock", "counter_303.db", "counter_dead.db", "gauge_livesum_303.db",
                                     "histogram_303.db", "histogram_dead.db"]


def test_a_scrape_never_sees_a_retirement_half_done(tmp_path, monkeypatch):
    """A scrape and retirements of many dead processes, at once: every scrape's total is the same."""
    d = str(tmp_path)
    req = mmap_key("vit_requests", "vit_requests_total", ["endpoint"], ["/x"], "HTTP requests")
    pids = list(range(1000, 1060))
    for pid in pids:
        _write(f"{d}/counter_{pid}.db", {req: 1.0})
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", d)
    seen = set()
    done = threading.Event()

    def scrape():
        m = metrics.Metrics()
        while not done.is_set():
            seen.add(re.search(r'vit_requests_total\{endpoint="/x"\} (\S+)', m.render().decode()).group(1))

    t = threading.Thread(target=scrape)
    t.start()
    try:
        for pid in pids:
            metrics.retire(pid, d)
    finally:
        done.set()
        t.join()
    assert seen == {"60.0"}, seen
    assert sorted(os.listdir(d)) == [".lock", "counter_dead.db"]


# -- the command lines' deadline -------------------------------------------------------------------
@pytest.mark.parametrize("cli", [cli_explain, cli_compare], ids=["explain", "compare"])
def test_help_says_what_the_600_s_deadline_bounds(cli, capsys):
    parser = cli._base_parser(add_help=True) if cli is cli_explain else cli._parser()
    [deadline] = [a for a in parser._actions if "--deadline" in a.option_strings]
    assert deadline.default == 600
    for words in ("default 600", "retries", "last byte", "--request-timeout-s"):
        assert words in deadline.help
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert " ".join(deadline.help.split()) in " ".join(capsys.readouterr().out.split())


def test_compare_stops_at_its_deadline(tmp_path):
    """`python -m service compare --server URL --deadline 2` against a server that accepts and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    image = tmp_path / "x.png"
    image.write_bytes(png_bytes(smooth_image(1, (32, 32))))
    out = io.StringIO()
    result = []
    t0 = time.monotonic()
    worker = threading.Thread(target=lambda: result.append(cli_compare.run(
        [str(image), "--setting", "rollout", "--server", f"http://127.0.0.1:{sock.getsockname()[1]}",
         "--deadline", "2"], out=out, err=out)), daemon=True)
    worker.start()
    worker.join(60)
    sock.close()
    assert result and result[0] != 0, out.getvalue()
    assert time.monotonic() - t0 < 60
