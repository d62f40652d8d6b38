"""The explorer page (GET /) in a real browser: headless Chromium driven by Playwright, against a
real `python -m service serve` with a random-weight DeiT-Tiny and an API key.

The page is checked the way a user meets it: the key asked for once, an image uploaded, the
parameters changed, the answer drawn. What it draws is compared with the API's JSON rendered
here (bilinear upsampling, jet colours from the `cmap` library), and every URL the browser asks
for must be the server's own (blob: and data: URLs of its own making included).

Playwright uses the system's Chromium (Debian's `chromium` package), never a downloaded one.
Without it the tests are skipped, with how to install it; in CI (CI or VIT_REQUIRE_BROWSER set)
a missing browser fails them.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess

import httpx
import numpy as np
import pytest
from cmap import Colormap
from PIL import Image

from service import imaging
from tests.conftest import png_bytes, smooth_image
from tests.server import running_server

try:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None
    PlaywrightError = Exception

KEY = "explorer-s3cret"
REQUIRED = bool(os.environ.get("CI") or os.environ.get("VIT_REQUIRE_BROWSER"))
HOW = ("the browser tests need Chromium and Playwright for Python: `apt-get install -y chromium` "
       "and `pip install playwright` (in the dev extra: `pip install -e '.[dev]'`); no `playwright install` needed")
TIMEOUT_MS = 60_000
JET = np.round(Colormap("jet").lut(256)[:, :3].astype(np.float64) * 255.0)


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    for path in ("/usr/bin/chromium", "/usr/lib/chromium/chromium", "/snap/bin/chromium"):
        if os.path.exists(path):
            return path
    return None


def _unavailable(why: str):
    message = f"{why}; {HOW}"
    if REQUIRED:
        pytest.fail(f"browser tests are required here (CI / VIT_REQUIRE_BROWSER): {message}")
    pytest.skip(message)


# -- fixtures: one server and one browser for the module ---------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        _unavailable("Playwright for Python is not installed")
    exe = chromium_path()
    if exe is None:
        _unavailable("no Chromium found (chromium on PATH or /usr/bin/chromium)")
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-dev-shm-usage"])
        except PlaywrightError as e:
            _unavailable(f"Chromium at {exe} did not start: {str(e).splitlines()[0]}")
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(model_dirs):
    args = ["--model", f"deit=local-dir:{model_dirs['deit_tiny_patch16_224']}", "--replicas-per-device", "1"]
    with running_server(args, env={"VIT_API_KEY": KEY}) as s:
        yield s


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.url, timeout=120, headers={"X-API-Key": KEY}) as c:
        yield c


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 320 x 240 picture (not square, not the model's size) as a file to upload."""
    path = tmp_path_factory.mktemp("explorer") / "photo.png"
    path.write_bytes(png_bytes(smooth_image(7, (320, 240))))
    return path


class Session:
    """One browser tab on the page, recording every request and every script error."""

    def __init__(self, server, context):
        self.server, self.context = server, context
        self.page = context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.requests: list[tuple[str, dict]] = []
        self.errors: list[str] = []
        context.on("request", lambda r: self.requests.append((r.url, r.headers)))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def open(self):
        self.page.goto(self.server.url + "/")
        self.page.wait_for_selector("body[data-ready=true]")
        return self

    def upload(self, path):
        self.page.set_input_files("#file", str(path))
        self.page.wait_for_selector("#predictions li")

    def method(self, name, col="a"):
        self.page.select_option(f"#column-{col} select.method", name)

    def set(self, name, value, col="a"):
        sel = f"#{col}-{name}"
        if self.page.eval_on_selector(sel, "e => e.tagName") == "SELECT":
            self.page.select_option(sel, str(value))
        else:
            self.page.fill(sel, str(value))

    def run(self, col="a", state="done"):
        self.page.click(f"#column-{col} button.run")
        self.page.wait_for_selector(f"#pane-{col}[data-state=done], #pane-{col}[data-state=error]")
        got = self.page.get_attribute(f"#pane-{col}", "data-state")
        assert got == state, self.page.inner_text(f"#pane-{col} .error")
        return self.last(col)

    def last(self, col="a"):
        return self.page.evaluate(
            """col => { const l = window.explorer.columns.find(c => c.id === col).last;
                        const {canvas, canvases, ...drawn} = l.drawn || {};
                        return {request: l.request, response: l.response, drawn, curl: l.curl,
                                progress: l.progress || null}; }""", col)

    def pixels(self, selector) -> np.ndarray:
        """The RGB pixels of a canvas, (h, w, 3)."""
        got = self.page.eval_on_selector(selector, """c => {
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let s = ''; for (let i = 0; i < d.length; i += 8192) s += String.fromCharCode(...d.subarray(i, i + 8192));
            return {w: c.width, h: c.height, data: btoa(s)}; }""")
        arr = np.frombuffer(base64.b64decode(got["data"]), np.uint8).reshape(got["h"], got["w"], 4)
        return arr[:, :, :3].astype(np.float64)

    def external(self) -> list[str]:
        own = (self.server.url + "/", f"blob:{self.server.url}/", "data:")
        return [u for u, _ in self.requests if not u.startswith(own)]


@pytest.fixture()
def tab(browser, server):
    """A fresh browser context with the key already in its session storage (as after entering it)."""
    context = browser.new_context(viewport={"width": 1360, "height": 900}, accept_downloads=True)
    context.add_init_script(f"sessionStorage.setItem('vit-explain.api-key', {json.dumps(KEY)})")
    s = Session(server, context)
    yield s
    context.close()
    assert s.external() == [], "the page fetched from outside the service"
    assert s.errors == [], s.errors


def render(mask, w: int, h: int) -> np.ndarray:
    """The page's overlay as this test expects it: bilinear upsampling (PIL's), then jet."""
    m = np.clip(imaging.upsample(np.asarray(mask, np.float32), (w, h)), 0.0, 1.0)
    return JET[np.minimum(255, np.floor(m * 255.0)).astype(int)]


def assert_drawn(got: np.ndarray, mask, w: int, h: int):
    assert got.shape == (h, w, 3)
    diff = np.abs(got - render(mask, w, h))
    # equal but where a value lies on a colour-table step (float32 rounding): a step of jet is
    # at most 4 levels of a channel
    assert diff.mean() < 0.5 and np.percentile(diff, 99.5) <= 4.5 and diff.max() <= 12, (diff.mean(), diff.max())


def api_post(api, path, photo, fields):
    resp = api.post(path, files={"image": (photo.name, photo.read_bytes(), "image/png")}, data=fields)
    assert resp.status_code == 200, resp.text
    return resp.json()


# -- the page and its files ------------------------------------------------------------------------
def test_the_page_and_its_files_load_without_the_key_and_the_api_needs_it(server, api):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for ref in ("/explorer/explorer.js", "/explorer/explorer.css"):
            assert ref in page.text
        for name, media in (("explorer.js", "text/javascript"), ("api.js", "text/javascript"),
                            ("draw.js", "text/javascript"), ("explorer.css", "text/css")):
            r = c.get(f"/explorer/{name}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(media), name
        assert c.get("/explorer/nothing.js").status_code == 404
        assert c.get("/explorer/%2e%2e%2fapp.py").status_code == 404
        assert c.get("/models").status_code == 401 and c.get("/models/deit/labels").status_code == 401
    labels = api.get("/models/deit/labels").json()
    assert labels["model"] == "deit" and len(labels["labels"]) == 1000 and "tabby" in labels["labels"][281]
    assert api.get("/models/nope/labels").status_code == 404
    spec = api.get("/openapi.json").json()
    assert "(/)" in spec["info"]["description"]  # /docs links to the page
    assert "/models/{name}/labels" in spec["paths"] and "/" not in spec["paths"]


def test_the_key_is_asked_for_once_and_sent_on_every_call(browser, server, photo):
    context = browser.new_context()
    s = Session(server, context)
    page = s.page
    page.goto(server.url + "/")
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", "wrong")
    page.click("#key-save")
    page.wait_for_selector("#key-dialog[open]")
    assert "refused" in page.inner_text("#key-message")
    page.fill("#key-input", KEY)
    page.click("#key-save")
    page.wait_for_selector("body[data-ready=true]")
    s.upload(photo)
    s.run()
    page.reload()  # the key is kept for the session: no dialog again
    page.wait_for_selector("body[data-ready=true]")
    assert not page.is_visible("#key-dialog")
    assert page.evaluate("sessionStorage.getItem('vit-explain.api-key')") == KEY
    calls = [(u, h) for u, h in s.requests if u.startswith(server.url) and "/explorer/" not in u
             and u.rstrip("/") != server.url]
    paths = {u.removeprefix(server.url) for u, _ in calls}
    assert paths >= {"/models", "/methods", "/models/deit/labels", "/predict", "/rollout"}
    first_with_key = next(i for i, (_, h) in enumerate(calls) if h.get("x-api-key") == KEY)
    assert all(h.get("x-api-key") == KEY for _, h in calls[first_with_key:])
    assert all(h.get("x-api-key") in (None, "wrong", KEY) for _, h in calls)
    context.close()
    assert s.external() == [] and s.errors == []


# -- what it draws -------------------------------------------------------------------------------
def test_the_rollout_overlay_is_the_api_json_mask(tab, api, photo):
    s = tab.open()
    s.upload(photo)
    assert s.page.get_attribute("#a-start_layer", "max") == "11"  # layers - 1, from GET /models
    s.set("head_fusion", "mean")
    s.set("discard_ratio", "0.5")
    s.set("start_layer", "2")
    got = s.run()
    assert got["request"] == {"model": "deit", "head_fusion": "mean", "discard_ratio": "0.5", "start_layer": "2",
                              "format": "json"}  # what differs from the defaults, and json to draw
    assert got["response"]["params"] == {"head_fusion": "mean", "discard_ratio": 0.5, "start_layer": 2}
    direct = api_post(api, "/rollout", photo, got["request"])
    np.testing.assert_allclose(got["response"]["mask"], direct["mask"], atol=1e-5)
    d = got["drawn"]
    assert (d["width"], d["height"]) == (384, 288)  # 320 x 240 drawn at 384 on the long side
    assert_drawn(s.pixels("#pane-a canvas.heat"), direct["mask"], d["width"], d["height"])
    # the colour bar and the top-5 predictions are on screen
    assert s.page.is_visible("#pane-a canvas.colour-bar")
    top = [p["label"] for p in direct["predictions"]]
    assert [t.rsplit(" (", 1)[0] for t in s.page.locator("#predictions .label").all_inner_texts()] == top
    # the curl command on screen makes the same request
    assert "-F head_fusion=mean" in got["curl"] and got["curl"].endswith(f"{s.server.url}/rollout")
    if shutil.which("curl"):
        out = subprocess.run(got["curl"], shell=True, cwd=photo.parent, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "VIT_API_KEY": KEY})
        np.testing.assert_allclose(json.loads(out.stdout)["mask"], direct["mask"], atol=1e-5)
    # downloads: the JSON on screen, and the picture on screen as a PNG
    with s.page.expect_download() as dl:
        s.page.click("#pane-a .download-json")
    assert json.loads(open(dl.value.path()).read()) == got["response"]
    with s.page.expect_download() as dl:
        s.page.click("#pane-a .download-png")
    assert dl.value.suggested_filename == "rollout.png"
    assert Image.open(dl.value.path()).size == (384, 288)


def test_the_class_picker_searches_the_labels_and_compare_shows_two_settings(tab, api, photo):
    s = tab.open()
    s.upload(photo)
    s.method("grad-rollout")
    s.page.fill("#column-a .class-search", "tabby")
    s.page.click("#column-a .class-list button[data-class='281']")
    assert s.page.input_value("#a-category_id") == "281"
    assert "tabby" in s.page.inner_text("#column-a .class-label")
    s.page.check("#compare")
    s.page.wait_for_selector("#column-b")
    assert s.page.input_value("#b-category_id") == "281"  # B starts as a copy of A
    s.set("head_fusion", "max", col="b")
    s.set("discard_ratio", "0", col="b")
    s.page.click("#run-all")
    for col in ("a", "b"):
        s.page.wait_for_selector(f"#pane-{col}[data-state=done]")
    a, b = s.last("a"), s.last("b")
    assert a["response"]["params"]["category_id"] == b["response"]["params"]["category_id"] == 281
    assert (a["response"]["params"]["head_fusion"], b["response"]["params"]["head_fusion"]) == ("mean", "max")
    for col, got in (("a", a), ("b", b)):
        direct = api_post(api, "/grad-rollout", photo, got["request"])
        np.testing.assert_allclose(got["response"]["mask"], direct["mask"], atol=1e-5)
        d = got["drawn"]
        assert_drawn(s.pixels(f"#pane-{col} canvas.heat"), direct["mask"], d["width"], d["height"])


def test_errors_show_the_services_detail(tab, photo):
    s = tab.open()
    s.upload(photo)
    s.method("grad-rollout")
    s.set("category_id", "5000")
    s.run(state="error")
    text = s.page.inner_text("#pane-a .error")
    assert "category_id: must be < 1000" in text  # the 422 detail as the service wrote it
    s.method("rollout")
    s.set("discard_ratio", "1.5")  # a pydantic error list: shown as field: message
    s.run(state="error")
    text = s.page.inner_text("#pane-a .error")
    assert "discard_ratio" in text and "less than 1" in text


def test_the_layer_montage_draws_every_block(tab, api, photo):
    s = tab.open()
    s.upload(photo)
    s.method("attention")
    options = s.page.eval_on_selector("#a-head", "e => [...e.options].map(o => o.value)")
    assert options == ["0", "1", "2", "mean", "max", "min"]  # 3 heads, then the fusions
    s.set("head", "max")
    got = s.run()
    assert s.page.locator("#pane-a .montage canvas.heat").count() == 12
    direct = api_post(api, "/attention", photo, got["request"])
    np.testing.assert_allclose(got["response"]["layers"], direct["layers"], atol=1e-5)
    d = got["drawn"]
    assert_drawn(s.pixels("#pane-a figure[data-layer='5'] canvas.heat"), direct["layers"][5], d["width"], d["height"])


def test_the_discard_sweep_plays_as_an_animation(tab, api, photo):
    s = tab.open()
    s.upload(photo)
    s.method("rollout-sweep")
    s.set("discard_ratios", "0,0.5,0.9")
    s.set("frame_ms", "100")
    got = s.run()
    assert got["response"]["discard_ratios"] == [0, 0.5, 0.9]
    s.page.wait_for_selector("#pane-a[data-frame='1']")  # it plays by itself
    s.page.wait_for_selector("#pane-a[data-frame='2']")
    s.page.click("#pane-a .play")
    assert s.page.get_attribute("#pane-a", "data-playing") == "false"
    s.page.fill("#pane-a input.frame", "1")  # the frame slider
    assert s.page.get_attribute("#pane-a", "data-frame") == "1"
    # the frame's value, labelled by the parameter the method declares with the role "frames"
    assert "discard ratios 0.5 · frame 2/3" in s.page.inner_text("#pane-a .ratio")
    direct = api_post(api, "/rollout/sweep", photo, got["request"])
    d = s.last()["drawn"]
    assert_drawn(s.pixels("#pane-a canvas.heat"), direct["masks"][1], d["width"], d["height"])


def test_a_picture_answer_in_jpeg_at_max_side_is_shown_and_downloaded(tab, api, photo):
    """Formats and max_side come from GET /methods: the page offers them without knowing them."""
    s = tab.open()
    s.upload(photo)
    options = s.page.eval_on_selector("#a-format", "e => [...e.options].map(o => o.value)")
    assert {"png", "jpeg", "webp", "json"} <= set(options)
    s.set("format", "jpeg")
    s.set("max_side", "160")
    got = s.run()
    assert got["request"]["format"] == "jpeg" and got["request"]["max_side"] == "160"
    assert s.page.get_attribute("#pane-a", "data-kind") == "picture"
    size = s.page.eval_on_selector("#pane-a img.picture", "i => [i.naturalWidth, i.naturalHeight]")
    assert size == [160, 120]  # 320 x 240 with its longest side at 160
    with s.page.expect_download() as dl:
        s.page.click("#pane-a .download-png")
    assert dl.value.suggested_filename == "rollout.jpeg"
    direct = api.post("/rollout", files={"image": (photo.name, photo.read_bytes(), "image/png")}, data=got["request"])
    assert direct.headers["content-type"] == "image/jpeg"
    assert open(dl.value.path(), "rb").read() == direct.content  # the service's own picture, as it sent it


def test_activation_maximization_shows_live_progress(tab):
    s = tab.open()
    # its steps run at the lowest CPU priority: on a busy machine they wait for the CPU
    s.page.set_default_timeout(3 * TIMEOUT_MS)
    s.method("activation-max")
    # the unit picker offers what the method declares, the MLP's hidden units among them
    options = s.page.eval_on_selector_all("#a-target option", "os => os.map(o => o.value)")
    assert options == ["class", "features", "mlp", "q", "k"], options
    s.set("steps", "5")
    s.set("seed", "3")
    s.page.click("#column-a button.run")
    # progress while it runs: the step count and the chart move before the answer is there (on a busy
    # machine all five steps may be done before the page is looked at: then only the end is checked)
    s.page.wait_for_function("() => { const p = document.querySelector('#pane-a');"
                             " return p.dataset.state !== 'running' || Number(p.dataset.step) >= 2; }")
    if s.page.get_attribute("#pane-a", "data-state") == "running":
        assert "/6 · objective" in s.page.inner_text("#pane-a .progress")  # 5 steps + the robustness pass
    s.page.wait_for_selector("#pane-a[data-state=done], #pane-a[data-state=error]")
    assert s.page.get_attribute("#pane-a", "data-state") == "done", s.page.inner_text("#pane-a .error")
    # every step's event reached the page, with the total it declares: the 5 steps and the robustness pass
    assert "step 6/6 · objective" in s.page.inner_text("#pane-a .progress")
    got = s.last()
    assert got["request"] == {"model": "deit", "steps": "5", "seed": "3", "format": "json"}
    assert "Accept: text/event-stream" in got["curl"]
    assert len(got["response"]["objective"]) == 5
    np.testing.assert_allclose(got["progress"][:-1], got["response"]["objective"], rtol=1e-6)
    answer = got["response"]
    assert got["progress"][-1] == pytest.approx(answer["final_objective"], rel=1e-6)
    # the figure the answer measures is shown with the picture
    caption = s.page.inner_text("#pane-a figure.result figcaption")
    shown = "–" if answer["robustness"] is None else f"{answer['robustness']:.2f}"
    assert f"robustness {shown}" in caption and f"{answer['final_objective']:.5g}"[:4] in caption, caption
    img = s.page.eval_on_selector("#pane-a img.long-result", "i => [i.complete, i.naturalWidth, i.naturalHeight]")
    assert img == [True, 224, 224]
    assert Image.open(io.BytesIO(base64.b64decode(got["response"]["image"]))).size == (224, 224)


# -- faithfulness ------------------------------------------------------------------------------------
def assert_curves(got: np.ndarray, deletion, insertion):
    """In columns across the chart, the pixels of each line's colour lie where its curve passes (the axis
    runs from 0 to the highest value; columns where the two curves come close are left out)."""
    h, w, _ = got.shape
    pad, top = 4, max(max(deletion), max(insertion))
    r, b = got[..., 0], got[..., 2]
    colours = {"red": (r > 150) & (b < 110), "blue": (b > 150) & (r < 110)}

    def y_at(values, x):
        t = (x - pad) / (w - 2 * pad) * (len(values) - 1)
        i = min(int(t), len(values) - 2)
        v = values[i] + (values[i + 1] - values[i]) * (t - i)
        slope = abs(values[i + 1] - values[i]) / top * (h - 2 * pad) / ((w - 2 * pad) / (len(values) - 1))
        return h - pad - (h - 2 * pad) * v / top, slope

    checked = 0
    for x in range(pad + 3, w - pad - 3, 5):
        (yd, sd), (yi, si) = y_at(deletion, x), y_at(insertion, x)
        if abs(yd - yi) < 6 or x < 60 and min(yd, yi) < 18:  # the lines meet, or the axis label is there
            continue
        for colour, want, slope in (("red", yd, sd), ("blue", yi, si)):
            ys = np.nonzero(colours[colour][:, x])[0]
            assert ys.size, f"no {colour} pixel in column {x}"
            assert np.min(np.abs(ys - want)) <= 2 + slope, (colour, x, want, ys)
        checked += 1
    assert checked >= 5, checked


def test_the_curves_and_areas_show_under_the_map(tab, api, photo):
    s = tab.open()
    s.upload(photo)
    s.method("grad-rollout")
    s.page.check("#a-faithfulness")
    s.set("faithfulness_steps", "3")
    s.set("removal", "mean")
    got = s.run()
    assert got["request"]["faithfulness"] == "true" and got["request"]["faithfulness_steps"] == "3"
    direct = api_post(api, "/grad-rollout", photo, got["request"])["faithfulness"]
    f = got["response"]["faithfulness"]
    np.testing.assert_allclose(f["deletion"], direct["deletion"], rtol=1e-6)
    fig = s.page.locator("#pane-a figure.faithfulness")
    assert float(fig.get_attribute("data-deletion-auc")) == pytest.approx(direct["deletion_auc"])
    text = fig.inner_text()
    assert f"deletion AUC {direct['deletion_auc']:.3f}" in text
    assert f"insertion AUC {direct['insertion_auc']:.3f}" in text
    assert "3 steps, mean" in text
    chart = s.pixels("#pane-a canvas.curves")
    assert_curves(chart, direct["deletion"], direct["insertion"])
    # off again: no curves
    s.page.uncheck("#a-faithfulness")
    got = s.run()
    assert "faithfulness" not in got["request"] and s.page.locator("#pane-a figure.faithfulness").count() == 0


def test_the_comparison_is_a_ranked_table_of_thumbnails(tab, api, photo):
    s = tab.open()
    s.upload(photo)
    settings = [{"method": "rollout", "params": {"head_fusion": "max"}},
                {"method": "grad-rollout", "params": {"category_id": 281}},
                {"method": "gae", "params": {"category_id": 281, "start_layer": 3}}]
    s.page.fill("#compare-settings", json.dumps(settings))
    s.page.fill("#compare-steps", "2")
    s.page.click("#compare-run")
    s.page.wait_for_selector("#comparison[data-state=done], #comparison[data-state=error]")
    assert s.page.get_attribute("#comparison", "data-state") == "done", s.page.inner_text("#comparison-error")
    data = s.page.evaluate("window.explorer.comparison")
    fields = {"model": "deit", "settings": json.dumps(settings), "faithfulness_steps": "2"}
    direct = api_post(api, "/compare", photo, fields)
    assert data["ranking"] == direct["ranking"]
    rows = s.page.locator("#comparison tbody tr")
    assert rows.count() == 3
    for rank, i in enumerate(direct["ranking"]):
        row = rows.nth(rank)
        assert row.get_attribute("data-result") == str(i)
        res = direct["results"][i]
        assert row.locator("td.deletion").inner_text() == f"{res['faithfulness']['deletion_auc']:.3f}"
        assert row.locator("td.setting-text").inner_text().startswith(res["method"])
        assert_drawn(s.pixels(f"#comparison tr[data-result='{i}'] canvas.heat"), res["mask"], 128, 96)
    # a bad setting shows the service's detail, naming the setting
    s.page.fill("#compare-settings", json.dumps([{"method": "qk"}]))
    s.page.click("#compare-run")
    s.page.wait_for_selector("#comparison[data-state=error]")
    assert "settings.0.method" in s.page.inner_text("#comparison-error")


def test_controls_follow_their_declared_conditions_and_the_default_comparison_is_the_comparable_methods(
        tab, api, photo):
    """What GET /methods declares drives the page: a parameter's `when` shows or hides its control, and
    the comparison's default settings are every `comparable` method, its required class the top one."""
    methods = {m["name"]: m for m in api.get("/methods").json()}
    s = tab.open()
    s.upload(photo)
    long = next(m for m in methods.values() if m["kind"] == "long")
    conditional = {p["name"]: p["when"] for p in long["params"] if p["when"]}
    assert conditional, "no declared condition to check"
    s.method(long["name"])
    for name, when in conditional.items():
        for field, values in when.items():
            for value in next(p["enum"] for p in long["params"] if p["name"] == field):
                s.set(field, value)
                assert s.page.is_visible(f"#a-{name}") == (value in values), (name, field, value)

    s.page.fill("#compare-settings", "")
    s.page.fill("#compare-steps", "2")
    s.page.click("#compare-run")
    s.page.wait_for_selector("#comparison[data-state=done], #comparison[data-state=error]")
    assert s.page.get_attribute("#comparison", "data-state") == "done", s.page.inner_text("#comparison-error")
    top = s.page.evaluate("window.explorer.predictions[0].class_id")
    want = [{"method": m["name"], "params": {p["name"]: top for p in m["params"] if p["required"] and
                                            p["below"] == "classes"}} for m in methods.values() if m["comparable"]]
    assert json.loads(s.page.input_value("#compare-settings")) == want
    results = s.page.evaluate("window.explorer.comparison")["results"]
    assert [r["method"] for r in results] == [w["method"] for w in want]
