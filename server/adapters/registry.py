"""Names to versions, where the store and the engine meet: lookups, uploads, deletes and operator actions.

A lookup resolves a name to its current stored version and takes a lease on it
(a ``Hold`` command: the version's record counts it until the lease is
released). Store changes run on worker threads; residency changes are commands
on the engine's inbox (:mod:`server.adapters.commands`), awaited through their
futures. Re-uploads and deletes made through another replica sharing the store
are noticed by lookups and followed here. Never touches torch; raises
:class:`adapters_store.errors.AdapterError`\\ s, which the HTTP side maps.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

from adapters_store.backend import AdapterStore, PutResult, StoredAdapter, content_digest
from adapters_store.errors import AdapterNotFound, InvalidAdapter, InvalidAdapterName
from adapters_store.names import check_name
from adapters_store.upload import place_files
from adapters_store.validation import AdapterSummary
from server.adapters.catalog import Catalog
from server.adapters.commands import (
    AdapterCommand,
    Evict,
    Hold,
    Load,
    Release,
    Retire,
    Revive,
    TakeSnapshot,
    Unpin,
)
from server.adapters.errors import AdapterBusy, AdapterInUse, LoadFailed
from server.adapters.model_names import adapter_named_by, base_name_clash
from server.adapters.residency import Snapshot, State
from server.adapters.store_report import StoreReport

log = logging.getLogger(__name__)
T = TypeVar("T")
Send = Callable[[AdapterCommand], "Future[Any] | None"]


@dataclass
class Lease:
    """A request's hold on the versions it looked up; released once, when its engine requests were submitted
    (each holds them itself from then on) or when it failed before."""

    adapters: tuple[StoredAdapter, ...]
    _send: Send = field(repr=False)
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        if not self._released and self.adapters:
            self._released = True
            self._send(Release(self.adapters))


@dataclass(frozen=True)
class Uploaded:
    adapter: StoredAdapter
    summary: AdapterSummary
    created: bool  # False when the same content was already the name's version (or a dry run)


class AdapterRegistry:
    def __init__(
        self,
        store: AdapterStore,
        catalog: Catalog,
        send: Send,
        max_upload_bytes: int,
        operation_timeout: float,
    ) -> None:
        self.store, self.catalog = store, catalog
        self.base_name = catalog.base_name
        self._send = send
        self.max_upload_bytes = max_upload_bytes
        self.operation_timeout = operation_timeout
        self._lock = threading.Lock()  # lookups run on worker threads
        self._deleting: set[str] = set()
        # the version each name had at this replica's latest lookup (its sequence number, the version or None)
        self._current: dict[str, tuple[int, StoredAdapter | None]] = {}
        self._lookups = 0
        self._changes: list[tuple[StoredAdapter, StoredAdapter | None]] = []
        self.report: StoreReport | None = None
        self._admin_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()

    # -- requests -------------------------------------------------------------

    def adapter_named_by(self, model: str) -> str | None:
        """The adapter a request's ``model`` names: None for the base model ('' or its name)."""
        return adapter_named_by(model, self.base_name)

    def lease(self, names: list[str]) -> Lease:
        """A lease on each name's current version, each checked servable. Runs on a worker thread."""
        adapters = tuple(self._lookup(name) for name in names)
        with self._lock:  # a delete marks its name under this lock before it waits: it sees this hold
            for adapter in adapters:
                if adapter.name in self._deleting:
                    raise AdapterNotFound(f"adapter {adapter.name!r} is being deleted")
            if adapters:
                self._send(Hold(adapters))
        return Lease(adapters, self._send)

    def find(self, name: str) -> StoredAdapter:
        try:
            return self.store.get(name)
        except (AdapterNotFound, InvalidAdapterName):
            raise AdapterNotFound(f"The model or adapter {name[:200]!r} does not exist") from None

    def listed(self) -> list[tuple[str, str | None]]:
        """The stored adapters as ``/v1/models`` lists them, sorted, each with None or why a request cannot use it.
        Names that clash with the base model's are left out: they would list the base model twice (the admin
        list shows them). Runs on a worker thread."""
        names = self.store.names()
        return [(name, self.catalog.problem(name)) for name in names if not base_name_clash(name, self.base_name)]

    def follow_changes(self) -> None:
        """Retire the versions lookups found replaced or deleted since the last call (re-uploads and deletes
        made through another replica sharing the store): a pin carries over to the new version, and the old
        one leaves memory once no request holds it. Runs on the event loop."""
        with self._lock:
            changes, self._changes = self._changes, []
        for old, new in changes:
            log.info("adapter %s changed in the store (now %s)", old.ref, new.ref if new else "deleted")
            self._spawn(self._follow(old, new))

    # -- admin: store changes ---------------------------------------------------

    def stage_upload(
        self, name: str, files: list[tuple[str, BinaryIO]], dry_run: bool
    ) -> tuple[Uploaded, PutResult | None]:
        """Validate an upload completely, then store it (unless ``dry_run``). Runs on a worker thread."""
        check_name(name)
        self.catalog.check_name_free(name)
        with self.store.staging() as staged:
            place_files(files, staged, self.max_upload_bytes)
            summary = self.catalog.validate_upload(staged)
            if dry_run:
                version = content_digest(staged)
                return Uploaded(StoredAdapter(name, version, staged), summary, created=False), None
            result = self.store.put(name, staged)
        self.catalog.remember(result.adapter, summary)
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
        """Refuse new requests for ``name``, wait until none holds it (it then leaves memory), then remove it
        from the store. If requests still hold it after the operation timeout, nothing is deleted."""
        async with self._admin_lock(name):
            adapter = await asyncio.to_thread(self.find, name)
            with self._lock:
                self._deleting.add(name)
            try:
                await self._until_done(Evict(name, reason="delete"), f"adapter {name!r} is used by running requests")
                await asyncio.to_thread(self.store.delete, name)
            finally:
                with self._lock:
                    self._deleting.discard(name)
            await self._collect_garbage()
            self._set_current(name, None)
            log.info("adapter %s deleted", adapter.ref)
            return adapter

    # -- admin: residency -----------------------------------------------------------

    async def load(self, name: str, pin: bool) -> StoredAdapter:
        """Bring ``name`` onto a device slot (and pin it): waits for the disk load and a free slot."""
        adapter = await asyncio.to_thread(self.find, name)
        summary = await asyncio.to_thread(self.catalog.summary, adapter)
        if isinstance(summary, str):
            raise InvalidAdapter(f"adapter {name!r} cannot be served: {summary}")
        try:
            await self._ask(Load(adapter, pin))
        except LoadFailed as exc:
            raise LoadFailed(f"adapter {name!r} cannot be loaded: {exc}") from None
        except TimeoutError:
            record = (await self.snapshot()).records.get(adapter.key)
            loading = record is not None and record.state is State.LOADING
            why = "its load did not finish" if loading else "no device slot came free"
            raise AdapterBusy(f"adapter {name!r}: {why} within {self.operation_timeout:g} s") from None
        return adapter

    async def unpin(self, name: str) -> StoredAdapter:
        adapter = await asyncio.to_thread(self.find, name)
        await self._ask(Unpin(name))
        return adapter

    async def evict(self, name: str) -> StoredAdapter:
        """Drop ``name`` from host memory and device slots (and unpin it) once no request holds it; the store
        keeps it."""
        adapter = await asyncio.to_thread(self.find, name)
        await self._until_done(Evict(name), f"adapter {name!r} is used by running requests")
        return adapter

    async def snapshot(self) -> Snapshot:
        return await self._ask(TakeSnapshot())

    def start_store_report(self, where: str) -> StoreReport:
        """Check every stored adapter in the background (see :mod:`server.adapters.store_report`)."""
        self.report = StoreReport(where, self.store.names, self.store.strays, self.catalog.verify)
        self.report.start()
        return self.report

    def close(self) -> None:
        if self.report is not None:
            self.report.stop()
        for task in self._tasks:
            task.cancel()

    # -- internals ----------------------------------------------------------------

    def _lookup(self, name: str) -> StoredAdapter:
        seq = self._begin_lookup()
        try:
            adapter = self.find(name)
        except AdapterNotFound:
            self._observe(seq, name, None)
            raise
        self._observe(seq, name, adapter)
        summary = self.catalog.summary(adapter)
        if isinstance(summary, str):
            raise InvalidAdapter(f"adapter {adapter.name!r} cannot be served: {summary}")
        return adapter

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

    async def _follow(self, old: StoredAdapter, new: StoredAdapter | None) -> None:
        """After a re-upload or delete (through this replica or another): carry a pin over to the new version,
        then retire the old one (it leaves once no request holds it) and remove its files."""
        with self._lock:
            now = self._current.get(old.name, (0, None))[1]
        if now is not None and now.version == old.version:
            return  # the name came back to this version meanwhile: nothing to retire
        try:
            if new is not None:
                self._send(Revive(new))  # the new version may be one that was retiring (the same content again)
            record = (await self.snapshot()).records.get(old.key)
            if new is not None and record is not None and record.pinned:
                try:
                    await self.load(new.name, pin=True)
                except Exception as exc:
                    log.warning("could not pin the new version %s: %s", new.ref, exc)
            done = self._send(Retire(old, "replaced" if new else "delete"))
            if done is not None:
                await asyncio.wrap_future(done)
            await self._collect_garbage()
        except Exception:
            log.exception("retiring %s failed; its files are removed at the next start", old.ref)

    async def _collect_garbage(self) -> None:
        """Remove the files of versions no name points to and no request holds."""
        held = (await self.snapshot()).held_versions()
        await asyncio.to_thread(self.store.collect_garbage, held)

    async def _ask(self, command: AdapterCommand) -> Any:
        """Send ``command`` and wait for its answer (TimeoutError after the operation timeout: it is cancelled)."""
        done = self._send(command)
        assert done is not None
        return await asyncio.wait_for(asyncio.wrap_future(done), self.operation_timeout)

    async def _until_done(self, command: Evict, busy: str) -> None:
        try:
            await self._ask(command)
        except TimeoutError:
            raise AdapterInUse(f"{busy} after {self.operation_timeout:g} s; retry later") from None

    def _admin_lock(self, name: str) -> asyncio.Lock:
        return self._admin_locks.setdefault(name, asyncio.Lock())

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
