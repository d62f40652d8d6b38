"""The README is true: every `curl` of the sh blocks of the README and docs/ runs as written against a
real server, and every relative link of the README and docs/ leads to a file (and heading) that exists.

The server is started as `make run` starts it (`python -m service serve` with the default models,
offline, so the demo model shapes-vit serves when DeiT's weights are not cached), on a free port
instead of 8000. Each command runs in bash in a scratch folder whose `examples` is the
repository's (so the README's relative paths resolve as from the repository root and the files
it writes land in the scratch folder), with one change besides the port: `-D FILE` after `curl`,
to read the answer's status and type.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.server import running_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 250
FIRST_CURL_BY = 40
MAGIC = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff", "image/gif": b"GIF8",
         "image/webp": b"RIFF", "text/plain": b"# HELP "}  # text/plain: Prometheus metrics
SUFFIX_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                ".webp": "image/webp", ".txt": "text/plain"}


def sh_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) of every command in the ```sh blocks; a line ending in `\\` or `|`
    continues on the next."""
    out, block, pending, start = [], False, "", 0
    for no, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            block = line.strip() == "```sh" if not block else False
            continue
        if not block:
            continue
        if not pending:
            start = no
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
        elif stripped.endswith("|"):
            pending += stripped + " "
        else:
            out.append((start, pending + stripped))
            pending = ""
    return out


def curls(md: Path = README) -> list[tuple[int, str]]:
    return [(no, c) for no, c in sh_commands(md.read_text()) if re.search(r"\bcurl\b", c)]


DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
CURLS = [(md, no, c) for md in DOCS for no, c in curls(md)]


def test_readme_is_short_and_starts_with_a_curl():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines (at most {MAX_LINES}): move details to docs/"
    found = curls()
    assert len(found) >= 3, "the README shows at least three curls"
    assert found[0][0] <= FIRST_CURL_BY, f"the first curl is on line {found[0][0]}, after line {FIRST_CURL_BY}"
    for _, cmd in found:
        assert "http://127.0.0.1:8000" in cmd, f"a README curl that does not call `make run`'s server: {cmd}"


@pytest.fixture(scope="module")
def server():
    with running_server([]) as s:
        yield s


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    (d / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    return d


def last_head(raw: str) -> tuple[int, dict[str, str]]:
    """The status and headers of the last response in a `curl -D` file (after any 100 Continue)."""
    blocks = [b for b in re.split(r"\r?\n\r?\n", raw) if b.startswith("HTTP/")]
    assert blocks, f"no answer recorded: {raw!r}"
    status_line, *lines = blocks[-1].splitlines()
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines if ":" in ln)}
    return int(status_line.split()[1]), headers


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize(("md", "line", "cmd"), CURLS, ids=[f"{md.relative_to(ROOT)}:{no}" for md, no, _ in CURLS])
def test_documented_curl_runs_as_written(server, workdir, md, line, cmd):
    headers_file = workdir / f"headers-{md.stem}-{line}.txt"
    run = re.sub(r"\bcurl\b", f"curl -D {headers_file}", cmd, count=1).replace("http://127.0.0.1:8000", server.url)
    out_match = re.search(r"(?:^|\s)-o\s+(\S+)", cmd)
    if out_match:
        (workdir / out_match.group(1)).unlink(missing_ok=True)
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {run}"], cwd=workdir, capture_output=True, timeout=180)
    assert proc.returncode == 0, f"{md.name} line {line} exited {proc.returncode}: {proc.stderr.decode()[-500:]}"
    status, headers = last_head(headers_file.read_text(errors="replace"))
    ctype = headers.get("content-type", "").split(";")[0]
    assert status == 200, f"{md.name} line {line}: HTTP {status}: {proc.stdout[:500]!r}"
    if out_match:
        body = (workdir / out_match.group(1)).read_bytes()
        expected = SUFFIX_TYPES[Path(out_match.group(1)).suffix]
        assert ctype == expected, f"{md.name} line {line} writes {out_match.group(1)} but got {ctype}"
        assert body.startswith(MAGIC[ctype]) and len(body) > 100, f"{md.name} line {line}: not a whole {ctype}"
    elif ctype == "application/json":
        answer = json.loads(proc.stdout)
        assert answer and "detail" not in answer
        if "format=json" in cmd:
            assert "model" in answer
    elif ctype == "text/event-stream":
        events = re.findall(r"^event: (\w+)", proc.stdout.decode(), re.M)
        assert events and events[-1] == "result" and "error" not in events, events
    else:
        pytest.fail(f"{md.name} line {line}: an answer of type {ctype!r} printed to the terminal")


def python_blocks(md: Path) -> list[tuple[int, str]]:
    text = md.read_text()
    blocks = re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S)
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in blocks]


PYTHON = [(md, no, code) for md in DOCS for no, code in python_blocks(md) if "http://127.0.0.1:8000" in code]


@pytest.mark.parametrize(("md", "line", "code"), PYTHON, ids=[f"{md.relative_to(ROOT)}:{no}" for md, no, _ in PYTHON])
def test_documented_client_code_runs_as_written(server, workdir, monkeypatch, capsys, md, line, code):
    """The client examples, run against the server: every call answers, of the type its comment says."""
    monkeypatch.chdir(workdir)
    scope: dict = {}
    exec(compile(code.replace("http://127.0.0.1:8000", server.url), f"{md.name}:{line}", "exec"), scope)
    assert scope["r"].mask.shape == (14, 14) and scope["r"].predictions
    assert scope["png"].startswith(MAGIC["image/png"])
    assert len(scope["both"]) == 2
    assert scope["frames"].shape == (3, 14, 14)
    printed = capsys.readouterr().out.count("\n")
    # a progress line per step, and one for the robustness pass after the last
    assert scope["best"].image.size == (224, 224) and len(scope["best"].objective) + 1 == printed
    if "table" in scope:
        assert sorted(scope["table"].ranking) == [0, 1]


# -- links -----------------------------------------------------------------------------------------
def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but hyphens dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


@pytest.mark.parametrize("md", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_every_relative_link_leads_somewhere(md):
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    broken = []
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = link.partition("#")
        target = (md.parent / path).resolve() if path else md
        if not target.is_relative_to(ROOT) or not target.exists():  # outside: dead in a clone elsewhere
            broken.append(link)
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(link)
    assert not broken, f"{md.relative_to(ROOT)}: broken links {broken}"
