"""Screenshots of the explorer page for the README: docs/explorer/*.png.

    .venv/bin/python docs/explorer/screenshots.py

Serves the demo model shapes-vit (it ships in the package, no network), makes a two-object
scene it recognises with demo.scenes, and photographs the page in headless Chromium (Debian's
`chromium`, driven by Playwright): a rollout overlay, gradient rollout for each of the two
objects side by side, and the per-layer montage. A PNG over 300 KB is saved in 256 colours.
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from demo.scenes import make_scene, scene_rng  # noqa: E402
from tests.server import running_server  # noqa: E402

OUT = ROOT / "docs" / "explorer"
SEED = 424242
VIEWPORT = {"width": 1280, "height": 760}


def find_scene(client: httpx.Client, tmp: Path) -> tuple[Path, list[int]]:
    """The first two-object scene whose top two predictions are its two objects."""
    for i in range(200):
        image, objects = make_scene(scene_rng(SEED, i), n_objects=2)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        preds = client.post("/predict", files={"image": ("scene.png", buf.getvalue())}).json()["predictions"]
        classes = [c for c, _ in objects]
        if {p["class_id"] for p in preds[:2]} == set(classes):
            path = tmp / "scene.png"
            path.write_bytes(buf.getvalue())
            return path, classes
    raise RuntimeError("no scene found")


LIMIT = 300 * 1024


def save(page, name: str) -> None:
    """The page as it is, full length; in 256 colours (dithered) only when full colour is too big."""
    img = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    path = OUT / f"{name}.png"
    img.save(path, optimize=True)
    if path.stat().st_size > LIMIT:
        palette = img.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        img.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(path, optimize=True)
    print(f"{path.relative_to(ROOT)}: {img.width} x {img.height}, {path.stat().st_size // 1024} KB")


def main() -> None:
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or "/usr/bin/chromium"
    OUT.mkdir(parents=True, exist_ok=True)
    model = f"shapes-vit=local-dir:{ROOT / 'service' / 'demo' / 'shapes-vit'}"
    with tempfile.TemporaryDirectory() as tmp, running_server(["--model", model]) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client, sync_playwright() as p:
        scene, classes = find_scene(client, Path(tmp))
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT, device_scale_factor=1)
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-ready=true]")
        page.set_input_files("#file", str(scene))
        page.wait_for_selector("#predictions li")

        def run(col: str = "a") -> None:
            page.click(f"#column-{col} button.run")
            page.wait_for_selector(f"#pane-{col}[data-state=done]")

        page.fill("#a-discard_ratio", "0.9")
        run()
        save(page, "rollout")

        page.select_option("#column-a select.method", "grad-rollout")
        page.fill("#a-category_id", str(classes[0]))
        page.check("#compare")
        page.wait_for_selector("#column-b")
        page.fill("#b-category_id", str(classes[1]))
        page.click("#run-all")
        for col in ("a", "b"):
            page.wait_for_selector(f"#pane-{col}[data-state=done]")
        save(page, "compare")

        page.uncheck("#compare")
        page.select_option("#column-a select.method", "attention")
        page.select_option("#a-head", "mean")
        run()
        save(page, "montage")
        browser.close()


if __name__ == "__main__":
    main()
