"""Whether each stored version can be served here: checked once per version, remembered.

Thread-safe: lookups, uploads and the start-up report call it from worker threads.
"""

from __future__ import annotations

import threading
from pathlib import Path

from adapters_store.backend import AdapterStore, StoredAdapter
from adapters_store.base_model import BaseModelSpec
from adapters_store.errors import AdapterError, InvalidAdapterName
from adapters_store.names import check_name
from adapters_store.validation import AdapterSummary, inspect, summarize, validate
from server.adapters.errors import NameConflict
from server.adapters.model_names import base_name_clash

Verdict = AdapterSummary | str  # the summary, or why the version cannot be served


class Catalog:
    def __init__(self, store: AdapterStore, spec: BaseModelSpec, base_name: str, max_rank: int) -> None:
        self.store, self.spec, self.base_name, self.max_rank = store, spec, base_name, max_rank
        self._lock = threading.Lock()
        self._verdicts: dict[str, Verdict] = {}  # version -> verdict
        self._invalid: dict[str, str] = {}  # name -> the version of it last found invalid

    def summary(self, adapter: StoredAdapter) -> Verdict:
        """The adapter's summary, or why it cannot be served: its name clashes with the base model's, or it
        does not fit the base model (headers only; remembered per version)."""
        known = self.known(adapter)
        if known is not None:
            return self._note(adapter, known)
        return self._check(adapter, full=False)

    def verify(self, name: str) -> Verdict | None:
        """The start-up check of one stored adapter: :meth:`summary`, and every tensor value read for a folder
        placed by hand (an upload's values were read before it was stored). None when this replica has no
        copy of it (a shared store's adapter never used here: checked on first use)."""
        try:
            check_name(name)
        except InvalidAdapterName as exc:
            return str(exc)
        if clash := base_name_clash(name, self.base_name):
            return clash
        adapter = self.store.get(name)
        if not self.store.cached(adapter):
            return None
        return self._check(adapter, full=True) if adapter.hand_placed else self.summary(adapter)

    def known(self, adapter: StoredAdapter) -> Verdict | None:
        """What is known of ``adapter`` without reading it: its name's clash, or its version's verdict."""
        with self._lock:
            known = self._verdicts.get(adapter.version)
        return base_name_clash(adapter.name, self.base_name) or known

    def check_name_free(self, name: str, param: str = "name") -> None:
        """Refuse a name a request could not reach the adapter by: the base model's, or one that resolves to
        another adapter."""
        if clash := base_name_clash(name, self.base_name):
            raise NameConflict(f"an adapter cannot be named {name[:200]!r}: {clash}", param)

    def validate_upload(self, staged: Path) -> AdapterSummary:
        """Every file and tensor value of a staged upload (raises what is wrong)."""
        return validate(staged, self.spec, self.max_rank)

    def remember(self, adapter: StoredAdapter, verdict: Verdict) -> None:
        with self._lock:
            self._verdicts[adapter.version] = verdict
        self._note(adapter, verdict)

    def problem(self, name: str) -> str | None:
        """Why a request cannot use ``name`` (a name no request can use, or found invalid at the version it
        still has), or None."""
        try:
            check_name(name)
        except AdapterError as exc:
            return str(exc)
        with self._lock:
            bad = self._invalid.get(name)
        if bad is None:
            return None
        try:
            if self.store.get(name).version != bad:
                return None  # replaced since: checked when used
        except AdapterError as exc:
            return str(exc)  # gone meanwhile, or not readable now
        with self._lock:
            verdict = self._verdicts.get(bad)
        return verdict if isinstance(verdict, str) else "found invalid"

    def _check(self, adapter: StoredAdapter, full: bool) -> Verdict:
        # The store's errors (down, version gone, a damaged copy a re-upload repairs) are about now, not
        # about the version: raised, not remembered. So are read errors (a file removed meanwhile).
        folder = self.store.locate(adapter)
        try:
            if full:
                verdict: Verdict = validate(folder, self.spec, self.max_rank)
            else:
                manifest, binding = inspect(folder, self.spec, self.max_rank)
                verdict = summarize(folder, manifest, binding)
        except AdapterError as exc:
            verdict = str(exc)
        self.remember(adapter, verdict)
        return verdict

    def _note(self, adapter: StoredAdapter, verdict: Verdict) -> Verdict:
        with self._lock:
            if isinstance(verdict, str):
                self._invalid[adapter.name] = adapter.version
            elif self._invalid.get(adapter.name) == adapter.version:
                del self._invalid[adapter.name]
        return verdict
