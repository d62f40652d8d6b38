"""The method registry is the one source: README table, routes, parameters, formats."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.app import create_app
from service.config import Settings
from service.methods import REGISTRY, markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_table_is_the_one_the_methods_declare():
    text = README.read_text()
    start, end = "<!-- methods-table:start -->\n", "\n<!-- methods-table:end -->"
    table = text[text.index(start) + len(start) : text.index(end)]
    assert table == markdown_table(), "README is stale: paste `python -m service.methods` between the markers"


def _prose(path: Path) -> str:
    return " ".join(path.read_text().split())  # line breaks as spaces


def test_the_hand_written_lists_of_methods_are_the_registrys():
    """Lists of methods in prose go stale when a method is added: each is checked against the declarations."""
    comparable = [m.name for m in REGISTRY.values() if m.comparable]
    faithful = [m.name for m in REGISTRY.values() if m.faithful]
    faith = README.parent / "docs" / "faithfulness.md"
    expected = [
        (README, f"several settings of the comparable methods ({', '.join(comparable)})"),
        (faith, f"declares `faithful` ({', '.join(faithful)}; the sweeps per frame)"),
        (faith, f"each a method ({', '.join(comparable)})"),
        (faith, '`{"method": ' + " | ".join(comparable) + ', "params": {...}}`'),
    ]
    for path, text in expected:
        assert text in _prose(path), f"{path.name} is stale: it should say {text!r} (the registry's declarations)"


def test_a_method_declares_faithful_and_comparable_in_its_own_class():
    from service.methods.registry import _check_declarations

    class Inherited(type(REGISTRY["rollout"])):  # a new map method over an existing one: nothing declared
        name = "inherited"

    with pytest.raises(ValueError, match="declare `faithful"):
        _check_declarations(Inherited)

    class Lying(type(REGISTRY["attention"])):
        name, faithful, comparable = "lying", False, True

    with pytest.raises(ValueError, match="comparable method is a faithful MaskMethod"):
        _check_declarations(Lying)


def test_every_method_has_its_route_and_strict_parameters():
    spec = create_app(Settings(models=["x=local-dir:/nonexistent"], device="cpu")).openapi()
    for m in REGISTRY.values():
        assert m.route in spec["paths"], m.name
        assert spec["paths"][m.route]["post"]["summary"] == m.summary
        with pytest.raises(ValidationError):
            m.Params(**{"no_such_field": 1})
        fmt = m.Params.model_fields.get("format")
        assert (fmt.default if fmt else "json") == m.formats[0], m.name
        if fmt:
            assert set(fmt.annotation.__args__) == set(m.formats), m.name


def test_equal_parameters_are_equal_jobs_and_per_image_ones_share_a_group():
    g = REGISTRY["grad-rollout"]
    a, b = g.job(g.Params(category_id=1)), g.job(g.Params(category_id=2))
    assert a != b and a.key == b.key  # one group, each with its own class
    r = REGISTRY["rollout"]
    assert r.job(r.Params(format="png")).key == r.job(r.Params(format="json")).key
    assert r.job(r.Params(discard_ratio=0.5)).key != r.job(r.Params()).key


def test_get_methods_declares_each_methods_kind_images_and_conditions():
    from fastapi.testclient import TestClient

    app = create_app(Settings(models=["x=local-dir:/nonexistent"], device="cpu", max_images=5))
    with TestClient(app) as c:
        listed = {m["name"]: m for m in c.get("/methods").json()}
    assert list(listed) == list(REGISTRY)
    for name, m in REGISTRY.items():
        info = listed[name]
        assert info["kind"] == m.kind and info["image"] == m.image, name
        assert info["max_images"] == (5 if m.max_images is None else min(m.max_images, 5)), name
        assert (info["faithful"], info["comparable"]) == (m.faithful, m.comparable), name
    long = [n for n, i in listed.items() if i["kind"] == "long"]
    assert long == ["activation-max"] and listed["activation-max"]["max_images"] == 1
    assert listed["activation-max"]["image"] == "optional"
    when = {p["name"]: p["when"] for p in listed["activation-max"]["params"]}
    assert when["category_id"] == {"target": ["class"]} and when["head"] == {"target": ["q", "k"]}
    assert when["steps"] is None
    assert all(i["kind"] == "one-pass" and i["image"] == "required" for n, i in listed.items() if n not in long)


def test_parameter_roles_are_known_and_one_of_each_per_method():
    """The explorer finds a sweep's frame values and frame duration by their declared role (GET /methods)."""
    from schemas.requests import ROLES

    declared = {}
    for m in REGISTRY.values():
        roles = [p.role for p in m.info(4).params if p.role]
        assert set(roles) <= set(ROLES) and len(roles) == len(set(roles)), (m.name, roles)
        declared[m.name] = set(roles)
    sweeps = [name for name, m in REGISTRY.items() if m.Response.__name__ == "SweepResponse"]
    assert sweeps and all(declared[name] == {"frames", "frame-ms"} for name in sweeps), declared
