"""What a request's ``model`` names: the base model, or one adapter.

No heavy imports: Ray's ingress reads it too, to route by adapter.
"""

from __future__ import annotations


def adapter_named_by(model: str, base_name: str) -> str | None:
    """None for the base model ('' or its served name); else the adapter's name, after an optional ``<base>:``."""
    if model in ("", base_name):
        return None
    return model.removeprefix(base_name + ":")
