"""Which adapter a request names: Ray's multiplexed model id for it (no Ray import here)."""

from __future__ import annotations

import json


def adapter_named(body: bytes, base_model: str) -> str | None:
    """The adapter a request's ``model`` names, as the replica's registry reads it: None for the base model
    ('' or its name, or no ``model``), the part after ``<base>:`` otherwise. An unreadable body: None
    (the replica answers with the error)."""
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(model, str) or model in ("", base_model):
        return None
    return model.removeprefix(base_model + ":") or None
