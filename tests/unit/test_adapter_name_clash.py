"""Which names an adapter may not take beside the base model: exactly those a request's `model` reads otherwise."""

from __future__ import annotations

import pytest

from server.adapters.model_names import adapter_named_by, base_name_clash

BASE = "SmolLM2-135M-Instruct"


@pytest.mark.parametrize(
    "name, why",
    [
        (BASE, f"'{BASE}' is the base model's served name: a request naming it is served by the base model"),
        ("", "the empty name: a request naming it is served by the base model"),
        (f"{BASE}:sql", f"a request naming '{BASE}:sql' is served by adapter 'sql'"),
    ],
)
def test_a_name_the_resolver_reads_otherwise_clashes_and_says_how(name, why):
    assert base_name_clash(name, BASE) == why
    assert adapter_named_by(name, BASE) != name  # the rule: the clash is exactly where `model` would go elsewhere


@pytest.mark.parametrize("name", ["sql", BASE.lower(), f"{BASE}-v2", f"{BASE}.sql", f"x:{BASE}"])
def test_other_names_are_free_and_reach_their_adapter(name):
    assert base_name_clash(name, BASE) is None
    assert adapter_named_by(name, BASE) == name
