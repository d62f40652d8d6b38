"""The Python client has a typed call for every registered method, with the method's parameters.

A method added to the registry without its client call, or a parameter renamed, added or dropped
on one side only, fails here (docs/methods.md, step 3)."""

from __future__ import annotations

import inspect

import pytest

from schemas.requests import FAITHFULNESS_FIELDS
from service import client
from service.methods import REGISTRY

CALLS = {name: getattr(client._Methods, name) for name in dir(client._Methods) if not name.startswith("_")}


def typed_call(method) -> inspect.Signature:
    name = method.name.replace("-", "_")
    assert name in CALLS, f"service/client/methods.py has no call {name}() for the method {method.name!r}"
    return inspect.signature(CALLS[name])


@pytest.mark.parametrize("method", list(REGISTRY.values()), ids=lambda m: m.name)
def test_every_method_has_a_typed_call_with_its_parameters(method):
    sig = typed_call(method)
    params = list(sig.parameters.values())[1:]  # after self
    positional = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    keywords = {p.name: p for p in params if p.kind is p.KEYWORD_ONLY}
    rest = [p for p in params if p.kind is p.VAR_KEYWORD]

    # the image(s) first: one or none for a method that takes at most one and may go without,
    # else one or several
    assert [p.name for p in positional] == (["image"] if method.max_images == 1 else ["images"])
    assert (positional[0].default is None) == (method.image == "optional")

    fields = dict(method.Params.model_fields)
    if method.faithful:  # the faithfulness options come as **faithfulness, checked against these
        assert [p.name for p in rest] == ["faithfulness"]
        assert set(client.FAITHFULNESS_OPTIONS) == set(FAITHFULNESS_FIELDS)
        fields = {k: f for k, f in fields.items() if k not in FAITHFULNESS_FIELDS}
    else:
        assert not rest, f"{method.name}: only methods with the faithfulness option take **options"
    # a call that always asks for JSON (a typed answer) may leave out `format`
    expected = set(fields) - ({"format"} if "format" not in keywords else set())
    extra = {"on_progress"} if method.kind == "long" else set()
    assert set(keywords) - extra == expected, f"{method.name}: the client's call and the Params differ"
    for name, f in fields.items():
        if name in keywords and name != "format":
            default = keywords[name].default
            if f.is_required():
                assert default is inspect.Parameter.empty, f"{method.name}: {name} is required by the service"
            else:
                assert default is None, f"{method.name}: {name} should default to None (the service's default)"


def test_long_work_calls_take_progress():
    for method in REGISTRY.values():
        if method.kind == "long":
            assert "on_progress" in typed_call(method).parameters
