"""The shape of the code, checked: no import circles, the engine free of methods, infrastructure
that knows methods only by their declarations (never a method's name or one of its parameters).

docs/methods.md explains the layers; these tests keep them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from schemas.requests import FAITHFULNESS_FIELDS, REQUEST_FIELDS
from service.methods import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "schemas", "bench", "demo")
# Modules that run requests through methods without being methods: they may use what methods
# declare (kind, Params, hooks), never a method's name or its own parameters.
INFRASTRUCTURE = ("service/api", "service/engine", "service/cli", "service/pool.py", "service/batching.py",
                  "service/app.py", "service/budget.py", "service/imaging.py", "service/workers.py")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports(name: str) -> set[str]:
    """The project modules `name` imports anywhere: at the top, inside functions, under `if TYPE_CHECKING:`.
    An import that only runs late or only for the type checker still closes a circle: a sign that a name
    lives in the wrong module."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names]
            # `from pkg import mod` imports the module; the package counts where a name is taken from it
            targets = subs + ([base] if any(sub not in MODULES for sub in subs) else [])
        else:
            continue
        out |= {t for t in targets if t in MODULES and t != name}
    return out


GRAPH = {name: imports(name) for name in MODULES}


def test_no_import_circles():
    seen: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str, path: list[str]) -> None:
        seen[name] = 1
        for dep in sorted(GRAPH[name]):  # a package importing its own modules counts too (registration)
            if seen.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [name, dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in seen:
                visit(dep, [*path, dep])
        seen[name] = 2

    for name in sorted(GRAPH):
        if name not in seen:
            visit(name, [name])


def test_the_engine_imports_no_method_and_no_layer_above_it():
    above = ("service.methods", "service.api", "service.pool", "service.batching", "service.app", "service.cli")
    for name, deps in GRAPH.items():
        if name.startswith("service.engine"):
            bad = sorted(d for d in deps if d.startswith(above))
            assert not bad, f"{name} imports {bad}"
    for name, deps in GRAPH.items():
        if name.startswith("schemas"):
            assert not [d for d in deps if d.startswith("service")], f"{name}: schemas are the lowest layer"


def method_parameters() -> set[str]:
    """Every parameter some method declares for itself (the shared request fields aside)."""
    names = set()
    for m in REGISTRY.values():
        names |= set(m.Params.model_fields)
    return names - REQUEST_FIELDS - FAITHFULNESS_FIELDS


def infrastructure_files() -> list[Path]:
    out = []
    for entry in INFRASTRUCTURE:
        p = ROOT / entry
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


PARAMS_OBJECTS = {"p", "params", "sp"}  # what the infrastructure calls a request's validated parameters


@pytest.mark.parametrize("path", infrastructure_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_infrastructure_names_no_method_and_no_method_parameter(path):
    """No `params.category_id`, `getattr(p, "discard_ratios")`, `"activation-max"`: such code belongs in a
    method module, behind a declared hook."""
    params, names = method_parameters(), set(REGISTRY)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in params and (
                ast.unparse(node.value) in PARAMS_OBJECTS or ast.unparse(node.value).endswith(".params")):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("getattr", "hasattr") and len(node.args) > 1 \
                and isinstance(node.args[1], ast.Constant) and node.args[1].value in params:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
            found.append(f"line {node.lineno}: {node.value!r}")
    assert not found, f"{path.name} names methods or their parameters: {found}"


def test_the_page_names_no_method_parameter():
    """The page learns what a parameter is for from GET /methods (`below`, `when`, `role`), never from its
    name: no `data.params.frame_ms`, no `values.category_id`, no "discard_ratios". A DOM event's `target`
    and a faithfulness score's own fields (`f.steps`) are not parameters."""
    from schemas import responses as rs

    params = method_parameters() - set(rs.Faithfulness.model_fields)
    for path in sorted((ROOT / "service/static/explorer").glob("*.js")):
        code = re.sub(r"//[^\n]*", "", path.read_text())  # comments may name anything
        reads = set()
        for m in re.finditer(r"(?:\?\.|\.)([A-Za-z_]\w*)", code):  # a.b, a?.b, a.b.c: every property read
            obj = re.search(r"(\w*)$", code[: m.start()]).group(1)
            if m.group(1) in params and obj not in ("e", "ev", "event"):
                reads.add(f"{obj}.{m.group(1)}")
        literals = set(re.findall(r"""["'`]([a-z][a-z0-9_]*)["'`]""", code)) & params
        assert not reads | literals, f"{path.name} names method parameters: {sorted(reads | literals)}"


def test_the_page_tells_methods_by_their_declarations_only():
    names = set(REGISTRY)
    for path in sorted((ROOT / "service/static/explorer").glob("*.js")):
        text = path.read_text()
        literals = set(re.findall(r"""["'`]([a-z][a-z0-9-]*)["'`]""", text))
        assert not literals & names, f"{path.name} names methods: {sorted(literals & names)}"
        reads_summary = re.search(r"summary\)|\.summary\s*\.|test\(\s*m\.summary", text)
        assert not reads_summary, f"{path.name} reads a summary's text"
