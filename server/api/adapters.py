"""Resolve a request's ``model`` to the base model or a stored, valid adapter."""

from __future__ import annotations

import threading

from adapters_store.base_model import BaseModelSpec
from adapters_store.errors import AdapterError, AdapterNotFound, InvalidAdapter, InvalidAdapterName
from adapters_store.local import LocalAdapterStore, StoredAdapter
from adapters_store.peft_format import bind, read_manifest
from server.api.errors import ApiError


class AdapterResolver:
    """Maps ``model`` to an adapter. The base model's name, ``""``, or ``base:`` mean no adapter.

    An adapter's files are checked against the base model (config and
    safetensors header: names, shapes, rank) once per version, before any
    request reaches the engine; tensor values are checked when loaded.
    """

    def __init__(self, store: LocalAdapterStore, spec: BaseModelSpec, base_name: str, max_rank: int) -> None:
        self.store, self.spec, self.base_name, self.max_rank = store, spec, base_name, max_rank
        self._checked: dict[tuple[str, str], str | None] = {}  # (name, version) -> error
        self._lock = threading.Lock()

    def resolve(self, model: str) -> StoredAdapter | None:
        name = model
        if model.startswith(self.base_name + ":"):
            name = model[len(self.base_name) + 1 :]
        if name in ("", self.base_name):
            return None
        try:
            adapter = self.store.get(name)
        except (AdapterNotFound, InvalidAdapterName):
            raise ApiError(
                404, f"The model or adapter {model[:200]!r} does not exist", "adapter_not_found", "model"
            ) from None
        error = self._check(adapter)
        if error is not None:
            raise ApiError(400, f"adapter {adapter.name!r} cannot be served: {error}", "invalid_adapter", "model")
        return adapter

    def _check(self, adapter: StoredAdapter) -> str | None:
        key = (adapter.name, adapter.version)
        with self._lock:
            if key in self._checked:
                return self._checked[key]
        try:
            bind(read_manifest(adapter.path), self.spec, self.max_rank)
            error = None
        except InvalidAdapter as exc:
            error = str(exc)
        except (AdapterError, OSError) as exc:
            error = f"unreadable: {exc}"
        with self._lock:
            self._checked[key] = error
        return error
