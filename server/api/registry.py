"""The adapter registry: the HTTP side's view of the store and of the engine's adapter tiers.

It resolves a request's ``model`` to a stored adapter version and hands out a
lease for it, held until the engine finishes the request; leases are how an
admin action knows which versions are in flight. Uploads, deletes, evictions
and loads are coordinated here: store changes run on worker threads, tier
changes run on the engine thread through :meth:`Engine.call`. Never touches torch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import BinaryIO, TypeVar

from adapters_store.backend import AdapterStore, PutResult, StoredAdapter, content_digest
from adapters_store.base_model import BaseModelSpec
from adapters_store.errors import AdapterError, AdapterNotFound, InvalidAdapterName
from adapters_store.names import check_name
from adapters_store.upload import place_files
from adapters_store.validation import AdapterSummary, inspect, summarize, validate
from server.api.errors import ApiError, unavailable
from server.api.model_names import adapter_named_by, base_name_clash
from server.api.store_report import StoreReport
from server.engine.adapter_cache import AdapterCache, PinLimitReached, Residence, Residency
from server.engine.engine import Engine

log = logging.getLogger(__name__)
T = TypeVar("T")
POLL_S = 0.02


@dataclass
class Lease:
    """One request's hold on one adapter version; released once, when the engine is done with it."""

    adapter: StoredAdapter
    _release: Callable[[Lease], None]
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._release(self)


@dataclass(frozen=True)
class Uploaded:
    adapter: StoredAdapter
    summary: AdapterSummary
    created: bool  # False when the same content was already the name's version (or a dry run)


class AdapterRegistry:
    def __init__(
        self,
        store: AdapterStore,
        spec: BaseModelSpec,
        base_name: str,
        max_rank: int,
        engine: Engine,
        cache: AdapterCache,
        max_upload_bytes: int,
        operation_timeout: float,
    ) -> None:
        self.store, self.spec, self.base_name, self.max_rank = store, spec, base_name, max_rank
        self.engine, self.cache = engine, cache
        self.max_upload_bytes = max_upload_bytes
        self.operation_timeout = operation_timeout
        self._lock = threading.Lock()  # leases are released on the engine thread
        self._leases: Counter[tuple[str, str]] = Counter()
        self._deleting: set[str] = set()
        self._last_used: dict[str, float] = {}
        # the version each name had at this replica's latest lookup (its sequence number, the version or None)
        self._current: dict[str, tuple[int, StoredAdapter | None]] = {}
        self._lookups = 0
        self._changes: list[tuple[StoredAdapter, StoredAdapter | None]] = []
        self._summaries: dict[str, AdapterSummary | str] = {}  # version -> summary, or why it cannot be served
        self._invalid: dict[str, str] = {}  # name -> the version of it last found invalid
        self.report: StoreReport | None = None
        self._admin_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()

    # -- requests -------------------------------------------------------------

    def base_alias(self, model: str) -> str | None:
        """The adapter ``model`` names: None for the base model ('' or its name), the name after ``base:``."""
        return adapter_named_by(model, self.base_name)

    def lease(self, name: str, param: str = "model") -> Lease:
        """A lease on ``name``'s current version, checked servable. Runs on a worker thread."""
        seq = self._begin_lookup()
        try:
            adapter = self.find(name, param=param)
        except ApiError as exc:
            if exc.code == "adapter_not_found":
                self._observe(seq, name, None)
            raise
        self._observe(seq, name, adapter)
        summary = self.summary(adapter)
        if isinstance(summary, str):
            raise ApiError(400, f"adapter {adapter.name!r} cannot be served: {summary}", "invalid_adapter", param)
        with self._lock:
            if name in self._deleting:
                raise ApiError(404, f"adapter {name!r} is being deleted", "adapter_not_found", param)
            self._leases[adapter.key] += 1
            self._last_used[name] = time.time()
        return Lease(adapter, self._release)

    def find(self, name: str, param: str | None = None) -> StoredAdapter:
        try:
            return self.store.get(name)
        except (AdapterNotFound, InvalidAdapterName):
            raise ApiError(
                404, f"The model or adapter {name[:200]!r} does not exist", "adapter_not_found", param
            ) from None

    def summary(self, adapter: StoredAdapter) -> AdapterSummary | str:
        """The adapter's summary, or why it cannot be served: its name clashes with the base model's, or it
        does not fit the base model (headers only; cached per version)."""
        known = self.known(adapter)
        if known is not None:
            return self._note(adapter, known)
        return self._check(adapter, full=False)

    def verify(self, name: str) -> AdapterSummary | str | None:
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

    def known(self, adapter: StoredAdapter) -> AdapterSummary | str | None:
        """What is known of ``adapter`` without reading it: its name's clash, or its version's checked result."""
        return base_name_clash(adapter.name, self.base_name) or self._summaries.get(adapter.version)

    def check_name_free(self, name: str, param: str = "name") -> None:
        """Refuse (409) a name a request could not reach the adapter by: the base model's, or one that resolves
        to another adapter."""
        if clash := base_name_clash(name, self.base_name):
            raise ApiError(409, f"an adapter cannot be named {name[:200]!r}: {clash}", "adapter_name_conflict", param)

    def listed(self) -> list[tuple[str, str | None]]:
        """The stored adapters as ``/v1/models`` lists them, sorted, each with None or why a request cannot use it
        (a name no request can use, or found invalid at the version it still has). Names that clash with the
        base model's are left out: they would list the base model twice (the admin list shows them). Runs on a
        worker thread."""
        return [(name, self._problem(name)) for name in self.store.names() if not base_name_clash(name, self.base_name)]

    def _problem(self, name: str) -> str | None:
        try:
            check_name(name)
        except AdapterError as exc:
            return str(exc)
        bad = self._invalid.get(name)
        if bad is None:
            return None
        try:
            if self.store.get(name).version != bad:
                return None  # replaced since: checked when used
        except AdapterError as exc:
            return str(exc)  # gone meanwhile, or not readable now
        problem = self._summaries.get(bad)
        return problem if isinstance(problem, str) else "found invalid"

    def _check(self, adapter: StoredAdapter, full: bool) -> AdapterSummary | str:
        # The store's errors (down, version gone, a damaged copy a re-upload repairs) are about now, not
        # about the version: raised, not remembered. So are read errors (a file removed meanwhile).
        folder = self.store.locate(adapter)
        try:
            if full:
                result: AdapterSummary | str = validate(folder, self.spec, self.max_rank)
            else:
                manifest, binding = inspect(folder, self.spec, self.max_rank)
                result = summarize(folder, manifest, binding)
        except AdapterError as exc:
            result = str(exc)
        self._summaries[adapter.version] = result
        return self._note(adapter, result)

    def _note(self, adapter: StoredAdapter, result: AdapterSummary | str) -> AdapterSummary | str:
        if isinstance(result, str):
            self._invalid[adapter.name] = adapter.version
        elif self._invalid.get(adapter.name) == adapter.version:
            self._invalid.pop(adapter.name, None)
        return result

    def follow_changes(self) -> None:
        """Retire the versions lookups found replaced or deleted since the last call (re-uploads and deletes
        made through another replica sharing the store): a pin carries over to the new version, and the old
        one leaves memory once no request uses it. Runs on the event loop."""
        with self._lock:
            changes, self._changes = self._changes, []
        for old, new in changes:
            log.info("adapter %s changed in the store (now %s)", old.ref, new.ref if new else "deleted")
            self._spawn(self._follow(old, new))

    def _begin_lookup(self) -> int:
        """A sequence number taken before a lookup: observations apply in the order lookups began."""
        with self._lock:
            self._lookups += 1
            return self._lookups

    def _set_current(self, name: str, adapter: StoredAdapter | None) -> None:
        """This replica's own upload or delete: the name's new state, with nothing to follow (the caller
        retires the old version itself)."""
        seq = self._begin_lookup()
        with self._lock:
            self._current[name] = (seq, adapter)

    def _observe(self, seq: int, name: str, adapter: StoredAdapter | None) -> None:
        """What lookup ``seq`` found for ``name``; a lookup older than the last one applied is ignored."""
        with self._lock:
            last, old = self._current.get(name, (0, None))
            if seq < last:
                return
            self._current[name] = (seq, adapter)
            if old is not None and (adapter is None or adapter.version != old.version):
                self._changes.append((old, adapter))

    def in_flight(self, name: str) -> int:
        with self._lock:
            return sum(n for (lease_name, _), n in self._leases.items() if lease_name == name)

    def leased_versions(self) -> set[str]:
        with self._lock:
            return {version for (_, version), n in self._leases.items() if n > 0}

    def last_used(self, name: str) -> float | None:
        return self._last_used.get(name)

    def _release(self, lease: Lease) -> None:
        with self._lock:
            self._leases[lease.adapter.key] -= 1
            if self._leases[lease.adapter.key] <= 0:
                del self._leases[lease.adapter.key]

    # -- admin: store changes ---------------------------------------------------

    def stage_upload(
        self, name: str, files: list[tuple[str, BinaryIO]], dry_run: bool
    ) -> tuple[Uploaded, PutResult | None]:
        """Validate an upload completely, then store it (unless ``dry_run``). Runs on a worker thread."""
        check_name(name)
        self.check_name_free(name)
        with self.store.staging() as staged:
            place_files(files, staged, self.max_upload_bytes)
            summary = validate(staged, self.spec, self.max_rank)
            if dry_run:
                version = content_digest(staged)
                return Uploaded(StoredAdapter(name, version, staged), summary, created=False), None
            result = self.store.put(name, staged)
        self._summaries[result.adapter.version] = summary
        self._note(result.adapter, summary)
        return Uploaded(result.adapter, summary, created=result.changed), result

    async def upload(self, name: str, files: list[tuple[str, BinaryIO]], dry_run: bool) -> Uploaded:
        async with self._admin_lock(name):
            uploaded, result = await asyncio.to_thread(self.stage_upload, name, files, dry_run)
            if result is not None:
                self._set_current(name, result.adapter)
            if result is not None and result.previous is not None and result.changed:
                self._spawn(self._follow(result.previous, result.adapter))
            log.info("adapter %s %s", uploaded.adapter.ref, "validated (dry run)" if dry_run else "stored")
            return uploaded

    async def delete(self, name: str) -> StoredAdapter:
        """Refuse new requests for ``name``, wait for its running ones, then remove it everywhere."""
        async with self._admin_lock(name):
            adapter = await asyncio.to_thread(self.find, name)
            with self._lock:
                self._deleting.add(name)
            try:
                await self._wait(lambda: self.in_flight(name) == 0, f"adapter {name!r} is used by running requests")
                await asyncio.to_thread(self.store.delete, name)
            finally:
                with self._lock:
                    self._deleting.discard(name)
            await self._on_engine(lambda: self.cache.evict(name, reason="delete"))
            await asyncio.to_thread(self.store.collect_garbage, self.leased_versions())
            self._last_used.pop(name, None)
            self._set_current(name, None)
            log.info("adapter %s deleted", adapter.ref)
            return adapter

    # -- admin: tiers -------------------------------------------------------------

    async def load(self, name: str, pin: bool) -> StoredAdapter:
        """Bring ``name`` onto a device slot (and pin it): waits for the disk load and a free slot."""
        adapter = await asyncio.to_thread(self.find, name)
        summary = await asyncio.to_thread(self.summary, adapter)
        if isinstance(summary, str):
            raise ApiError(400, f"adapter {name!r} cannot be served: {summary}", "invalid_adapter")
        deadline = time.monotonic() + self.operation_timeout
        while True:
            try:
                got = await self._on_engine(lambda: self.cache.pin(adapter) if pin else self.cache.prefetch(adapter))
            except PinLimitReached as exc:
                raise ApiError(409, str(exc), "pin_limit_reached") from None
            if got.state is Residency.READY:
                return adapter
            if got.state is Residency.FAILED:
                raise ApiError(400, f"adapter {name!r} cannot be loaded: {got.error}", "adapter_load_failed")
            if time.monotonic() > deadline:
                why = "its load did not finish" if got.state is Residency.LOADING else "no device slot came free"
                raise unavailable(f"adapter {name!r}: {why} within {self.operation_timeout:g} s", "adapter_busy")
            await asyncio.sleep(POLL_S)

    async def unpin(self, name: str) -> StoredAdapter:
        adapter = await asyncio.to_thread(self.find, name)
        await self._on_engine(lambda: self.cache.unpin(name))
        return adapter

    async def evict(self, name: str) -> StoredAdapter:
        """Drop ``name`` from host memory and device slots (and unpin it); the store keeps it."""
        adapter = await asyncio.to_thread(self.find, name)

        async def evicted() -> bool:
            return await self._on_engine(lambda: self.cache.evict(name)) == 0

        await self._wait(evicted, f"adapter {name!r} is used by running requests")
        return adapter

    async def residence(self) -> dict[tuple[str, str], Residence]:
        return await self._on_engine(self.cache.residence)

    def start_store_report(self, where: str) -> StoreReport:
        """Check every stored adapter in the background (see :mod:`server.api.store_report`)."""
        self.report = StoreReport(where, self.store.names, self.store.strays, self.verify)
        self.report.start()
        return self.report

    def close(self) -> None:
        if self.report is not None:
            self.report.stop()
        for task in self._tasks:
            task.cancel()

    # -- internals ----------------------------------------------------------------

    async def _follow(self, old: StoredAdapter, new: StoredAdapter | None) -> None:
        with self._lock:
            now = self._current.get(old.name, (0, None))[1]
        if now is not None and now.version == old.version:
            return  # the name came back to this version meanwhile: nothing to retire
        pinned = await self._on_engine(lambda: self.cache.pinned(old.name))
        await self._retire(old, pin_next=new if pinned else None, reason="replaced" if new else "delete")

    async def _retire(self, old: StoredAdapter, pin_next: StoredAdapter | None, reason: str = "replaced") -> None:
        """After a re-upload or delete (through this replica or another): carry a pin over to the new version,
        then free the old one once no request uses it."""
        try:
            if pin_next is not None:
                try:
                    await self.load(pin_next.name, pin=True)
                except (ApiError, AdapterError) as exc:
                    log.warning("could not pin the new version %s: %s", pin_next.ref, exc)
            while True:
                with self._lock:
                    leased = self._leases.get(old.key, 0)
                evict = lambda: self.cache.evict(old.name, old.version, reason)  # noqa: E731
                if not leased and await self._on_engine(evict) == 0:
                    break
                await asyncio.sleep(0.1)
            await asyncio.to_thread(self.store.collect_garbage, self.leased_versions())
        except Exception:
            log.exception("retiring %s failed; its files are removed at the next start", old.ref)

    async def _wait(self, done: Callable[[], bool | Awaitable[bool]], busy: str) -> None:
        deadline = time.monotonic() + self.operation_timeout
        while True:
            result = done()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            if time.monotonic() > deadline:
                raise ApiError(409, f"{busy} after {self.operation_timeout:g} s; retry later", "adapter_in_use")
            await asyncio.sleep(POLL_S)

    async def _on_engine(self, fn: Callable[[], T]) -> T:
        return await asyncio.wait_for(asyncio.wrap_future(self.engine.call(fn)), self.operation_timeout)

    def _admin_lock(self, name: str) -> asyncio.Lock:
        return self._admin_locks.setdefault(name, asyncio.Lock())

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
