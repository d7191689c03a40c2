"""What a request's ``model`` names: the base model, or one adapter.

No heavy imports: Ray's ingress reads it too, to route by adapter.
"""

from __future__ import annotations


def adapter_named_by(model: str, base_name: str) -> str | None:
    """None for the base model ('' or its served name); else the adapter's name, after an optional ``<base>:``."""
    if model in ("", base_name):
        return None
    return model.removeprefix(base_name + ":")


def base_name_clash(name: str, base_name: str) -> str | None:
    """Why ``name`` cannot name an adapter served beside the base model ``base_name``, or None if it can.

    A name may be an adapter's only if a request whose ``model`` is that name reaches that adapter:
    never the base model (its served name, ``""``) and never another adapter (``<base>:other``).
    """
    named = adapter_named_by(name, base_name)
    if named == name:
        return None
    if named is None:
        what = "the empty name" if name == "" else f"{name[:200]!r} is the base model's served name"
        return f"{what}: a request naming it is served by the base model"
    return f"a request naming {name[:200]!r} is served by adapter {named[:200]!r}"
