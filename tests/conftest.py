"""Shared fixtures: random-weight timm ViTs saved as local-dir folders, and test images.

No test touches the network: HF_HUB_OFFLINE is set before timm is imported.
"""

from __future__ import annotations

import copy
import io
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models import save_for_hf

# The three architectures the issue names: a class token; class + distillation token; a 7x7 grid.
ARCHS = ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "vit_small_patch32_224"]

# Fixtures that start a process, by name in every test module: a test that uses one, directly or
# through another fixture, gets these markers (registered in pyproject.toml). `make test-fast` runs
# -m "not slow". A test that starts a process in its own body carries @pytest.mark.slow itself.
PROCESS_FIXTURES = {
    "server": ("slow",),  # python -m service serve (tests/server.py), one per module
    "servers": ("slow",),  # two of them (tests/test_device_decode.py)
    "browser": ("slow", "browser"),  # Chromium through Playwright (tests/test_explorer.py)
    "cluster": ("slow", "ray"),  # a local Ray cluster and Serve (tests/test_ray.py)
    "single": ("slow", "ray"),
}


# `make test` runs the suite on pytest-xdist workers (-n 3 --dist loadfile -m "not solo"): three keep the two
# cores busy while some tests wait on sockets and timers. Each test module runs whole on one
# worker, so a module's server (browser, Ray cluster) starts once, and never two Ray clusters or two browsers
# run at once. (Not --dist loadgroup: pytest-xdist 3.8 marks a group by rewriting `item._nodeid`, which
# pytest 9.2 no longer reads, so every group was silently ignored and each module server started on every
# worker that drew one of its tests.) The tests marked `solo` (each bounds a latency or counts a server's CPU)
# run after that (`-m solo`), on two workers with loadfile: one module per core, its tests one at a time. Their
# bounds hold there with room to spare (measured: the 504s of 1 s and 3 s timeouts came at 1.00 and 3.0-3.06 s,
# a probe past the connection limit in 0.03-0.05 s against 1 s), and the run takes a minute, not two.

# One torch thread per pytest-xdist worker: three workers on two cores with two OpenMP threads each spend
# more CPU spinning and switching than computing (the same float64 forwards took 2.3x the CPU time with two
# threads as with one, on the loaded box). The servers the tests start choose their own threads (service/app.py).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


# The modules that keep a worker longest (make test prints the slowest tests), first: with --no-loadscope-reorder
# pytest-xdist hands modules out in collection order, so these start at once and the run does not end on one of
# them with the other workers idle (by default it orders them by test count). The first three run side by side
# from the start: two that mostly wait (Ray's cluster, the CLI's retries) beside one that computes (the bench).
LONGEST_FIRST = ["test_ray.py", "test_bench.py", "test_client_cli.py", "test_activation_max.py",
                 "test_hostile3_work.py", "test_workers.py", "test_hostile2.py", "test_production.py",
                 "test_faithfulness.py", "test_api.py", "test_long_work.py", "test_explorer.py", "test_hostile.py",
                 "test_readme.py", "test_compare.py", "test_methods.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = {m for f in getattr(item, "fixturenames", ()) for m in PROCESS_FIXTURES.get(f, ())}
        for name in sorted(names):
            item.add_marker(name)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its order


def make_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False).eval()


@pytest.fixture(scope="session")
def models() -> dict[str, torch.nn.Module]:
    return {a: make_model(a, seed=i) for i, a in enumerate(ARCHS)}


@pytest.fixture(scope="session")
def model_dirs(models, tmp_path_factory) -> dict[str, str]:
    """Each random model saved the way `timm.models.save_for_hf` writes a local-dir folder."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for arch, m in models.items():
        save_for_hf(m, str(root / arch), safe_serialization=True)
        out[arch] = str(root / arch)
    return out


# the near-zero model of issue 17: one block, embed 48, 224 px (a 14 x 14 grid): a server's CPU is its request path
TINY_ARGS = dict(depth=1, embed_dim=48, num_heads=3, num_classes=10)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """The near-zero model saved as a local-dir folder."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_ARGS).eval()
    path = str(tmp_path_factory.mktemp("tiny") / "tiny")
    save_for_hf(model, path, model_args=TINY_ARGS, safe_serialization=True)
    return path


@pytest.fixture()
def client(server):
    """An HTTP client of the module's `server` fixture, where that yields the server's URL (modules
    whose `server` is something else define their own `client`)."""
    import httpx

    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


def smooth_image(seed: int, size: tuple[int, int] = (224, 224)) -> Image.Image:
    """A random image with structure at several scales (w, h), not just pixel noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    layers = []
    for cells in (4, 16, 64):
        coarse = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        layers.append(np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR), np.float32))
    return Image.fromarray(np.clip(sum(layers) / len(layers), 0, 255).astype(np.uint8))


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A photograph-like image (w, h): structure at four scales plus sensor-like noise, so that
    its JPEG is as large as a camera's (about 1.8 bits per pixel at quality 90)."""
    rng = np.random.default_rng(seed)
    w, h = size
    acc = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((4, 1.0), (16, 0.6), (64, 0.35), (256, 0.2)):
        coarse = rng.uniform(0, 255, (cells, max(1, cells * w // h), 3)).astype(np.uint8)
        acc += amp * np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), np.float32)
    acc /= 2.15
    acc += rng.normal(0, 6, (h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def setups(models):
    """Per architecture: a CPU Engine, the float64 Reference of the same weights, 3 preprocessed images."""
    from service.engine.engine import Engine
    from tests import reference as ref

    out = {}
    for arch in ARCHS:
        m = models[arch]
        engine = Engine(copy.deepcopy(m), torch.device("cpu"))
        x = torch.stack([ref.preprocess(smooth_image(s), m) for s in range(3)])
        out[arch] = (engine, ref.Reference(m), x)
    return out
