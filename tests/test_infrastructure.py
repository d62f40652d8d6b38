"""The infrastructure's seams (issue 19): one settings-to-flags builder for both serving command
lines, nothing importing the entry point, ray only in service/ray_serve.py, one Retry-After, one
media-type table, one log set-up, a clear error for an unknown device, the app's description
built from the registry, and the connection guards refusing a uvicorn they cannot hook."""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import re
import signal
import tomllib
from pathlib import Path

import pytest

from schemas import media
from service import client, flags, http, imaging, logs, server
from service.cli import serve as serve_cli
from service.config import Settings
from service.methods import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
SERVICE = sorted((ROOT / "service").rglob("*.py"))
OURS = SERVICE + sorted((ROOT / "schemas").rglob("*.py")) + sorted((ROOT / "tests").rglob("*.py")) \
    + sorted((ROOT / "bench").rglob("*.py")) + sorted((ROOT / "demo").rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imports(tree: ast.Module) -> set[str]:
    """Every module an `import` names, and each `from M import n` as M and M.n."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return out


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# -- the import graph ---------------------------------------------------------------------------
def test_no_module_imports_the_entry_point():
    """tests/zygote.py is the one that may: it runs the entry point in the servers it forks, as `python -m service`."""
    offenders = [_rel(p) for p in OURS if "service.__main__" in _imports(_tree(p)) and _rel(p) != "tests/zygote.py"]
    assert not offenders, f"import the command's own module instead of service.__main__: {offenders}"


def test_only_ray_serve_imports_ray():
    offenders = [_rel(p) for p in SERVICE
                 if any(m == "ray" or m.startswith("ray.") for m in _imports(_tree(p)))]
    assert offenders == ["service/ray_serve.py"], offenders


# -- one settings-to-flags builder --------------------------------------------------------------
def _sample(name: str) -> tuple[list[str], object]:
    """A flag of the setting `name` and the override it must give."""
    field = Settings.model_fields[name]
    if name == "models":
        return ["--model", "a=local-dir:/x", "--model", "b=local-dir:/y"], ["a=local-dir:/x", "b=local-dir:/y"]
    flag = "--" + name.replace("_", "-")
    if field.annotation is bool:
        return [f"--no-{flag[2:]}"], False
    return [flag, "7"], "7"


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_setting_is_a_flag_of_serve(name):
    argv, want = _sample(name)
    assert flags.settings_overrides(serve_cli.parser().parse_args(argv)) == {name: want}


def test_a_flag_left_out_is_no_override():
    assert flags.settings_overrides(serve_cli.parser().parse_args([])) == {}


def test_the_entry_point_dispatches_to_each_command():
    """python -m service COMMAND runs the command's module: serve's own error, and exit 2 for none."""
    import subprocess
    import sys

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "service", *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)

    done = run("serve", "--device", "tpu")
    assert done.returncode == 2 and "is not one the service runs on" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    done = run("no-such-command")
    assert done.returncode == 2 and "invalid choice" in done.stderr, done.stderr


# -- a clear error for an unknown device ---------------------------------------------------------
@pytest.mark.parametrize("device", ["tpu", "cuda:x", "", ",", "cpu,tpu"])
def test_an_unknown_device_is_a_clear_error_and_exit_2(device, capsys):
    assert serve_cli.main(["--device", device]) == 2
    err = capsys.readouterr().err
    assert "is not one the service runs on" in err and "Traceback" not in err


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "cuda:0,cuda:1", "cpu:0"])
def test_known_devices_are_settings(device):
    assert Settings(device=device).device == device


# -- the app's description -------------------------------------------------------------------------
def test_the_app_description_names_every_method():
    from service.app import create_app

    app = create_app(Settings(models=["shapes-vit=local-dir:/nowhere"], device="cpu"))
    described = app.openapi()["info"]["description"]
    for m in REGISTRY.values():
        assert f"`POST {m.route}` ({m.name}): {m.summary}" in described, m.name


# -- one Retry-After --------------------------------------------------------------------------------
def test_retry_after_is_defined_once_and_used_everywhere():
    """Only service/config.py binds RETRY_AFTER_S; no Retry-After is given as a literal; every
    module that sends the header or hands Serve its back-pressure imports the one value."""
    for path in SERVICE:
        tree = _tree(path)
        binds = [n for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign))
                 for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                 if isinstance(t, ast.Name) and t.id == "RETRY_AFTER_S"]
        assert not binds or _rel(path) == "service/config.py", f"{_rel(path)} defines its own RETRY_AFTER_S"
        literal = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.keyword)
                   and n.arg in ("retry_after", "retry_after_s") and isinstance(n.value, ast.Constant)]
        literal += [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Dict) for k, v in zip(n.keys, n.values)
                    if isinstance(k, ast.Constant) and k.value == "retry_after_s" and isinstance(v, ast.Constant)]
        assert not literal, f"{_rel(path)}:{literal}: a Retry-After literal; use service.config.RETRY_AFTER_S"
        sends = any(isinstance(n, ast.Constant) and isinstance(n.value, (str, bytes))
                    and n.value.lower() in ("retry-after", b"retry-after", "retry_after_s") for n in ast.walk(tree))
        if sends and not _rel(path).startswith("service/client/"):  # the client reads the header, never sends it
            assert "service.config.RETRY_AFTER_S" in _imports(tree), f"{_rel(path)} sends Retry-After: import it"


def test_the_raw_refusal_carries_the_retry_after():
    from service.config import RETRY_AFTER_S

    head = http.raw_response(503, "busy", retry_after=RETRY_AFTER_S).split(b"\r\n\r\n")[0]
    assert f"retry-after: {RETRY_AFTER_S}".encode() in head.split(b"\r\n")


# -- one media-type table ----------------------------------------------------------------------------
def test_one_media_type_table():
    assert client.MEDIA_TYPES is media.MEDIA_TYPES and imaging.MEDIA_TYPES is media.MEDIA_TYPES
    for m in REGISTRY.values():
        assert set(m.formats) <= set(media.MEDIA_TYPES), m.name
    # no second table: no other literal maps a format to its media type
    for path in SERVICE + sorted((ROOT / "schemas").rglob("*.py")):
        if _rel(path) == "schemas/media.py":
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Dict):
                pairs = {(k.value, v.value) for k, v in zip(node.keys, node.values)
                         if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)}
                assert not pairs & set(media.MEDIA_TYPES.items()), f"{_rel(path)}:{node.lineno}: a second media table"


def test_the_client_stays_light():
    import subprocess
    import sys

    code = ("import sys, service.client; heavy = [m for m in ('torch', 'timm', 'fastapi', 'service.imaging') "
            "if m in sys.modules]; sys.exit(str(heavy) if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_client_reaches_into_no_private_attribute_of_httpx_or_httpcore():
    """`transport._pool` and the like break on any httpx release: a private attribute is read only on
    the client's own objects (`self._x`, `cls._x`)."""
    found = [f"{_rel(f)}:{n.lineno}: {ast.unparse(n)}" for f in sorted((ROOT / "service" / "client").glob("*.py"))
             for n in ast.walk(_tree(f)) if isinstance(n, ast.Attribute) and n.attr.startswith("_")
             and not n.attr.startswith("__") and ast.unparse(n.value) not in ("self", "cls")]
    assert not found, f"the client reaches into private attributes: {found}"


# -- one log set-up ------------------------------------------------------------------------------------
def test_the_log_setup_of_a_replica_leaves_the_root_logger_alone(capsys):
    root = logging.getLogger()
    before = list(root.handlers)
    logs.configure_logging("info", True, logger="test-infrastructure")
    target = logging.getLogger("test-infrastructure")
    try:
        assert root.handlers == before and target.propagate is False and len(target.handlers) == 1
        token = logs.request_id.set("find-me-7")
        try:
            target.info("hello")
        finally:
            logs.request_id.reset(token)
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert (line["request_id"], line["message"], line["logger"]) == ("find-me-7", "hello", "test-infrastructure")
    finally:
        target.handlers.clear()
        target.propagate = True


def test_text_log_lines_carry_the_request_id():
    handler = logging.StreamHandler(io.StringIO())
    handler.addFilter(logs.RequestIdFilter())
    handler.setFormatter(logging.Formatter(logs.TEXT_FORMAT))
    record = logging.LogRecord("service", logging.INFO, __file__, 1, "hi", None, None)
    handler.handle(record)
    assert handler.stream.getvalue().rstrip().endswith("service [-] hi")


# -- the connection guards and the uvicorn they hook -----------------------------------------------
def test_the_uvicorn_pin_is_the_tested_range():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [spec] = [d for d in deps if d.startswith("uvicorn")]
    (lo, hi) = http.TESTED_UVICORN
    assert spec == f"uvicorn[standard]>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}", spec


def test_the_installed_uvicorn_is_hooked_without_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="service.http"):
        http.check_uvicorn()
    assert not caplog.records


def test_a_uvicorn_outside_the_tested_range_is_named_at_start(caplog):
    with caplog.at_level(logging.WARNING, logger="service.http"):
        http.check_uvicorn("9.1.0")
    assert any("uvicorn 9.1.0 is outside" in r.getMessage() for r in caplog.records)


def test_a_protocol_without_the_hooks_refuses_to_start(monkeypatch):
    class Changed(http.HttpToolsProtocol):
        on_headers_complete = None  # as if uvicorn had renamed the callback

    with pytest.raises(ValueError, match="lacks on_headers_complete.*refusing to serve unguarded"):
        http.check_uvicorn(protocol=Changed)

    class Stateless(http.HttpToolsProtocol):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            del self.pipeline  # as if uvicorn kept its pipeline elsewhere

    with pytest.raises(ValueError, match=r"lacks self\.pipeline"):
        http.check_uvicorn(protocol=Stateless)
    # and the server refuses to start on it (serve() answers exit 2 with the message)
    monkeypatch.setattr(http, "HOOKS", (*http.HOOKS, "no_such_hook"))
    with pytest.raises(ValueError, match="no_such_hook"):
        server.connection_limits(Settings())


def test_serving_uses_the_guarded_protocol():
    limits = server.connection_limits(Settings(max_connections=5, read_timeout_s=3, max_header_kb=4))
    proto = limits["http"]
    assert issubclass(proto, http.GuardedHttpToolsProtocol)
    assert (proto.max_connections, proto.header_timeout, proto.max_header_bytes) == (5, 3.0, 4096)


def test_proxy_doc_names_what_the_asgi_level_cannot_do():
    doc = (ROOT / "docs" / "proxy.md").read_text()
    for setting in ("client_header_timeout", "large_client_header_buffers", "limit_conn", "request_headers_timeout",
                    "max_request_headers_kb"):
        assert re.search(rf"\b{setting}\b", doc), setting


def test_the_longest_modules_named_first_exist_and_the_makefile_keeps_their_order():
    """tests/conftest.py's LONGEST_FIRST: a renamed module would silently lose its place; pytest-xdist keeps
    the collection order only with --no-loadscope-reorder, and keeps a module on one worker with loadfile. The
    solo run keeps a module on one worker too (its tests never beside each other), on no more workers than cores."""
    from tests.conftest import LONGEST_FIRST

    here = Path(__file__).parent
    assert [name for name in LONGEST_FIRST if not (here / name).exists()] == []
    makefile = (here.parent / "Makefile").read_text()
    xdist = re.search(r"^XDIST\s*\?=(.*)$", makefile, re.M).group(1).split()
    assert {"--dist", "loadfile", "--no-loadscope-reorder"} <= set(xdist)
    solo = re.search(r"^SOLO_XDIST\s*\?=(.*)$", makefile, re.M).group(1).split()
    assert {"--dist", "loadfile"} <= set(solo) and int(solo[solo.index("-n") + 1]) <= 2
    assert "$(SOLO_XDIST) -m solo" in makefile


# -- the test servers: forked by a zygote, or fresh (tests/server.py, tests/zygote.py) ----------------------
def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("PPid:")).split()[1])


@pytest.mark.slow
@pytest.mark.parametrize("fresh", ["0", "1"])
def test_a_test_server_gets_its_environment_and_reports_its_exit_like_a_subprocess(tiny_dir, monkeypatch, fresh):
    """Forked or fresh, a test server reads the environment it was given (the API key), and its end reads as
    Popen's does (-9 after SIGKILL); a forked one's parent is the zygote, a fresh one's this process."""
    import httpx

    from tests.server import running_server

    monkeypatch.setenv("VIT_TEST_FRESH_SERVERS", fresh)
    with running_server(["--model", f"tiny=local-dir:{tiny_dir}"], env={"VIT_API_KEY": "k3y"}) as s:
        assert (_ppid(s.proc.pid) == os.getpid()) == (fresh == "1")
        assert httpx.get(s.url + "/models", timeout=10).status_code == 401
        assert httpx.get(s.url + "/models", headers={"X-API-Key": "k3y"}, timeout=10).status_code == 200
        assert s.proc.poll() is None
        s.proc.kill()
        assert s.proc.wait(timeout=30) == -signal.SIGKILL and s.proc.poll() == -signal.SIGKILL
