"""Which adapter a request names: Ray's multiplexed model id for it (no Ray import here)."""

from __future__ import annotations

import json

from server.adapters.model_names import adapter_named_by


def adapter_named(body: bytes, base_model: str) -> str | None:
    """The adapter a request's ``model`` names, as the replica's registry reads it: None for the base model
    ('' or its name, or no ``model``), the part after ``<base>:`` otherwise. An unreadable body: None
    (the replica answers with the error)."""
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(model, str):
        return None
    return adapter_named_by(model, base_model) or None
