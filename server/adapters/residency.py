"""An adapter version's whole life on this server: one record per (name, digest), owned by the engine thread.

::

                 read_ahead / acquire        loaded              acquire (a free slot)
      STORED ───────────────────────▶ LOADING ──────▶ HOST ───────────────────────────▶ DEVICE
        ▲  ▲                             │             │  ▲                               │
        │  └─── retryable failure ───┐   │ failed      │  └──── slot reused (LRU) ────────┤
        │       (the next acquire)   │   ▼             │                                  │
        │                            FAILED            │ host copy dropped (LRU)          │ slot reused, no host copy
        └──────────────────────────────────────────────┴──────────────────────────────────┘

      any state ── retire (re-uploaded, deleted) ──▶ RETIRING ── refs reach 0 ──▶ gone
      RETIRING ── revive (the same content is current again) ──▶ the state its fields say
      any state ── evict ── refs reach 0 ──▶ gone (a later request starts again at STORED)

The state is derived from the record's fields (its slot, host copy, load, error,
retirement), so it cannot disagree with them. ``refs`` is the one count of the
requests holding a version: taken when the HTTP side looks the name up (a
``Hold`` command) or when the engine accepts a request, released when the engine
is done with it; waiting for "no request uses it" is a future resolved when it
reaches zero. A device slot is busy while a *running* request uses it: the
scheduler passes that from its running list (``busy``), so no second count is kept.

Threads: every method runs on the engine thread. The loader thread only reads
files (:mod:`server.adapters.loader`); other threads send commands
(:mod:`server.adapters.commands`) and read :class:`Snapshot`\\ s.
"""

from __future__ import annotations

import enum
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Collection, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from adapters_store.backend import StoredAdapter
from server.adapters.errors import LoadFailed, PinLimitReached
from server.adapters.loader import DiskLoader
from server.lora.slots import SlotPool
from server.lora.weights import AdapterWeights
from server.metrics import Metrics

log = logging.getLogger(__name__)

AdapterKey = tuple[str, str]  # (name, version)


class State(enum.Enum):
    STORED = "stored"  # only in the store
    LOADING = "loading"  # being read from disk
    HOST = "host"  # in host memory
    DEVICE = "device"  # on a device slot (its host copy may be gone)
    FAILED = "failed"  # cannot be loaded: see ``error``
    RETIRING = "retiring"  # replaced or deleted: serves the requests holding it, then leaves


class Outcome(enum.Enum):
    """What :meth:`Residency.acquire` found."""

    READY = "ready"  # on a device slot
    LOADING = "loading"  # being read from disk
    NO_SLOT = "no_slot"  # in host memory but every slot is busy (or draining for an older waiter)
    FAILED = "failed"  # cannot be loaded: see the error


@dataclass(frozen=True)
class Acquired:
    outcome: Outcome
    slot: int = -1
    error: str | None = None
    retryable: bool = False  # the failure says nothing lasting about the version (e.g. the store was down)


@dataclass
class _Leaving:
    """An eviction or retirement waiting for its records' requests: resolved when the last one leaves."""

    future: Future[None]
    reason: str  # for the metrics: admin | delete | replaced
    remaining: int
    retire: bool = False  # a retirement (over if the version becomes current again), not an eviction


@dataclass(eq=False)
class AdapterRecord:
    adapter: StoredAdapter
    refs: int = 0  # requests holding this version (waiting, running, or looked up and about to be)
    pinned: bool = False  # kept on its slot until unpinned
    slot: int = -1  # its device slot, or -1
    weights: AdapterWeights | None = None  # its host copy
    loading: bool = False
    error: str | None = None
    retryable: bool = False
    retiring: bool = False
    loads: int = 0  # disk -> host reads
    activations: int = 0  # host -> device copies
    last_load_s: float | None = None
    last_activation_s: float | None = None
    used_at: int = 0  # when a request last took its slot (a tick: the slots' LRU order)
    last_used: float | None = None  # wall time a request last held it
    leaving: list[_Leaving] = field(default_factory=list)

    @property
    def key(self) -> AdapterKey:
        return self.adapter.key

    @property
    def state(self) -> State:
        if self.retiring:
            return State.RETIRING
        if self.error is not None:
            return State.FAILED
        if self.slot >= 0:
            return State.DEVICE
        if self.loading:
            return State.LOADING
        return State.STORED if self.weights is None else State.HOST

    @property
    def tier(self) -> str:
        """Where its nearest copy is: device, host or disk."""
        return "device" if self.slot >= 0 else "disk" if self.weights is None else "host"

    @property
    def host_bytes(self) -> int:
        return 0 if self.weights is None else self.weights.nbytes


@dataclass(frozen=True)
class Snapshot:
    """The records as they were (copies, for other threads) and the tiers' totals."""

    records: dict[AdapterKey, AdapterRecord]
    slots_total: int
    slots_in_use: int  # busy with running requests, or pinned
    host_bytes: int
    host_bytes_limit: int

    def in_flight(self, name: str) -> int:
        return sum(r.refs for r in self.records.values() if r.adapter.name == name)

    def last_used(self, name: str) -> float | None:
        times = [r.last_used for r in self.records.values() if r.adapter.name == name and r.last_used]
        return max(times, default=None)

    def held_versions(self) -> set[str]:
        """Versions some request holds: their files must stay."""
        return {r.adapter.version for r in self.records.values() if r.refs > 0}


class Residency:
    """The records, the host tier (LRU, bounded in bytes) and the device slots (LRU among those not busy)."""

    def __init__(self, slots: SlotPool, host_bytes: int, loader: DiskLoader, metrics: Metrics | None = None) -> None:
        self.slots = slots
        self.host_bytes_limit = host_bytes
        self.host_bytes = 0
        self.loader = loader
        self.metrics = metrics
        self._records: dict[AdapterKey, AdapterRecord] = {}
        self._host: OrderedDict[AdapterKey, None] = OrderedDict()  # versions with a host copy, LRU first
        self._on_slot: list[AdapterRecord | None] = [None] * slots.num_slots
        self._draining: int | None = None  # a busy slot refusing new requests so an older waiter gets it
        self._ticks = itertools.count(1)
        self._pending: list[tuple[StoredAdapter, bool, Future[None]]] = []  # operator loads: (adapter, pin, done)

    # -- references -----------------------------------------------------------

    def hold(self, adapter: StoredAdapter) -> AdapterRecord:
        """One more request holds ``adapter``'s version (until :meth:`release`)."""
        record = self._record(adapter)
        record.refs += 1
        record.last_used = time.time()
        return record

    def release(self, adapter: StoredAdapter) -> None:
        record = self._records.get(adapter.key)
        if record is None or record.refs <= 0:
            raise RuntimeError(f"adapter {adapter.ref} released more often than held")
        record.refs -= 1
        if record.refs == 0:
            self._settle(record)

    # -- device slots for requests --------------------------------------------

    def acquire(
        self, adapter: StoredAdapter, busy: Mapping[int, int], holding: Collection[int] = (), new_slot: bool = True
    ) -> Acquired:
        """Put ``adapter`` on a device slot, or say why not yet (starting its load from disk if needed).

        ``busy``: running requests per slot (those slots are never reassigned). ``holding``: slots the
        caller took already for the same request (a composition). ``new_slot`` False: only an adapter already
        on a slot is taken (an older request waits for the free ones); a load from disk still starts.
        """
        self.collect()
        if self._draining is not None and not busy.get(self._draining):
            self._draining = None  # it drained: the waiters take it in their order
        record = self._record(adapter)
        if record.slot >= 0:
            if record.slot == self._draining:
                return Acquired(Outcome.NO_SLOT)
            record.used_at = next(self._ticks)
            return Acquired(Outcome.READY, record.slot)
        if record.weights is None and record.error is None:
            self._start_load(record)
            self.collect()  # a loader may finish at once (tests' loaders do)
        if record.error is not None:
            error, retryable = record.error, record.retryable
            if retryable:  # the store was down or the version gone: this request fails, the next tries again
                record.error, record.retryable = None, False
            return Acquired(Outcome.FAILED, error=error, retryable=retryable)
        if record.weights is None:
            return Acquired(Outcome.LOADING)
        self._host.move_to_end(record.key)
        free = [s for s in range(self.slots.num_slots) if not busy.get(s) and s not in holding and not self._pinned(s)]
        if not new_slot or not free:
            if new_slot:
                self._pick_draining(busy, holding)
            if self.metrics:
                self.metrics.slot_wait()
            return Acquired(Outcome.NO_SLOT)
        slot = min(free, key=self._reuse_order)
        self._activate(record, slot)
        return Acquired(Outcome.READY, slot)

    def read_ahead(self, adapter: StoredAdapter) -> None:
        """Start reading ``adapter`` from disk into host memory (no slot), for a request queued behind full
        batches: it can take a slot as soon as one frees instead of queueing for the loader then."""
        self.collect()
        record = self._record(adapter)
        if record.slot < 0 and record.weights is None and record.error is None:
            self._start_load(record)

    def capacity(self, adapters: Collection[StoredAdapter]) -> int:
        """Slots ``adapters`` could ever hold together: those not pinned by other adapters."""
        keys = {a.key for a in adapters}
        return self.slots.num_slots - sum(1 for r in self._on_slot if r is not None and r.pinned and r.key not in keys)

    def tier(self, adapter: StoredAdapter) -> str:
        record = self._records.get(adapter.key)
        return record.tier if record else "disk"

    def slots_in_use(self, busy: Mapping[int, int]) -> int:
        return sum(1 for s in range(self.slots.num_slots) if busy.get(s) or self._pinned(s))

    # -- operators --------------------------------------------------------------

    def load(
        self, adapter: StoredAdapter, pin: bool, busy: Mapping[int, int], done: Future[None] | None = None
    ) -> Future[None]:
        """Bring ``adapter`` onto a slot (and pin it); the future resolves once it is there, or fails.

        Tried again on every engine iteration until then (:meth:`retry_loads`); cancel it to give up.
        """
        done = done or Future()
        if pin and not self._pin_allowed(adapter):
            _resolve(done, self._pin_limit())
            return done
        self._pending.append((adapter, pin, done))
        self.retry_loads(busy)
        return done

    @property
    def loads_waiting(self) -> bool:
        return bool(self._pending)

    def retry_loads(self, busy: Mapping[int, int]) -> None:
        still: list[tuple[StoredAdapter, bool, Future[None]]] = []
        for adapter, pin, done in self._pending:
            if done.cancelled():
                continue
            try:
                got = self.acquire(adapter, busy)
            except Exception as exc:
                _resolve(done, exc)
                continue
            if got.outcome is Outcome.READY:
                record = self._record(adapter)
                if pin and not record.pinned and not self._pin_allowed(adapter):  # another pin came first
                    _resolve(done, self._pin_limit())
                    continue
                if pin and _resolve(done):
                    record.pinned = True
                elif not pin:
                    _resolve(done)
            elif got.outcome is Outcome.FAILED:
                _resolve(done, LoadFailed(got.error or "unknown error"))
            else:
                still.append((adapter, pin, done))
        self._pending = still

    def unpin(self, name: str) -> bool:
        pinned = [r for r in self._records.values() if r.adapter.name == name and r.pinned]
        for record in pinned:
            record.pinned = False
        return bool(pinned)

    def evict(
        self, name: str, version: str | None = None, reason: str = "admin", done: Future[None] | None = None
    ) -> Future[None]:
        """Drop ``name``'s versions (or one) from host memory and device slots, unpinned, once no request holds
        them; the future resolves then. Cancel it to give up: records still held are left as they are."""
        records = [r for r in self._records.values() if r.adapter.name == name and version in (None, r.adapter.version)]
        return self._leave(records, reason, done or Future())

    def retire(self, adapter: StoredAdapter, reason: str, done: Future[None] | None = None) -> Future[None]:
        """``adapter``'s version was replaced or deleted: unpinned now, gone once no request holds it (a request
        holding it still runs on it). The future resolves then; cancelling it does not stop the retirement."""
        done = done or Future()
        record = self._records.get(adapter.key)
        if record is None:
            _resolve(done)
            return done
        record.retiring, record.pinned = True, False
        return self._leave([record], reason, done, retire=True)

    def revive(self, adapter: StoredAdapter) -> None:
        """``adapter``'s version is a name's current one again (the same content re-uploaded while it retired):
        it stays, and the retirement's wait is over."""
        record = self._records.get(adapter.key)
        if record is None or not record.retiring:
            return
        record.retiring = False
        for w in [w for w in record.leaving if w.retire]:
            record.leaving.remove(w)
            w.remaining -= 1
            if w.remaining == 0:
                _resolve(w.future)

    def snapshot(self, busy: Mapping[int, int]) -> Snapshot:
        """Every record as it is now (it changes nothing; other threads get one through ``TakeSnapshot``)."""
        copies = {key: replace(r, leaving=[]) for key, r in list(self._records.items())}
        return Snapshot(copies, self.slots.num_slots, self.slots_in_use(busy), self.host_bytes, self.host_bytes_limit)

    # -- the loader's results -------------------------------------------------------

    def collect(self) -> None:
        """Move finished disk reads into the host tier."""
        for done in self.loader.finished():
            if self.metrics:
                self.metrics.adapter_loaded("host", done.seconds, ok=done.weights is not None)
            record = self._records.get(done.adapter.key)
            if record is None or not record.loading:
                continue  # evicted meanwhile
            record.loading = False
            if done.weights is None:
                record.error, record.retryable = done.error or "unknown error", done.retryable
                continue
            record.loads += 1
            record.last_load_s = done.seconds
            self._make_room(done.weights.nbytes)
            record.weights = done.weights
            self._host[record.key] = None
            self.host_bytes += done.weights.nbytes

    def close(self) -> None:
        self.loader.close()

    # -- internals ------------------------------------------------------------------

    def _record(self, adapter: StoredAdapter) -> AdapterRecord:
        record = self._records.get(adapter.key)
        if record is None:
            record = self._records[adapter.key] = AdapterRecord(adapter)
        return record

    def _start_load(self, record: AdapterRecord) -> None:
        if not record.loading:
            record.loading = True
            self.loader.start(record.adapter)

    def _pinned(self, slot: int) -> bool:
        record = self._on_slot[slot]
        return record is not None and record.pinned

    def _pins(self) -> int:
        return sum(1 for s in range(self.slots.num_slots) if self._pinned(s))

    def _pin_allowed(self, adapter: StoredAdapter) -> bool:
        record = self._records.get(adapter.key)
        return bool(record and record.pinned) or self._pins() < self.slots.num_slots - 1

    def _pin_limit(self) -> PinLimitReached:
        return PinLimitReached(
            f"{self._pins()} of {self.slots.num_slots} slots are pinned already; one must stay free "
            "for other adapters (raise --max-loras or unpin one)"
        )

    def _reuse_order(self, slot: int) -> tuple[bool, bool, int]:
        """Empty slots first, then those whose adapter no request holds, then the least recently used."""
        record = self._on_slot[slot]
        if record is None:
            return (False, False, 0)
        return (True, record.refs > 0, record.used_at)

    def _activate(self, record: AdapterRecord, slot: int) -> None:
        assert record.weights is not None
        old = self._on_slot[slot]
        if old is not None:
            self._off_slot(old)
            if self.metrics:
                self.metrics.adapter_evicted("device", "lru")
        started = time.perf_counter()
        try:
            self.slots.write(slot, record.weights)
        except Exception:  # the slot stays usable (write zeroes what it does not copy)
            if self.metrics:
                self.metrics.adapter_loaded("device", time.perf_counter() - started, ok=False)
            raise
        record.activations += 1
        record.last_activation_s = time.perf_counter() - started
        if self.metrics:
            self.metrics.adapter_loaded("device", record.last_activation_s, ok=True)
        record.slot, record.used_at = slot, next(self._ticks)
        self._on_slot[slot] = record

    def _off_slot(self, record: AdapterRecord) -> None:
        self._on_slot[record.slot] = None
        record.slot = -1

    def _pick_draining(self, busy: Mapping[int, int], exclude: Collection[int]) -> None:
        """Every slot is busy: stop admitting onto the one closest to free, so the waiter gets it next."""
        if self._draining is not None:
            return
        held = [s for s, n in busy.items() if n > 0 and s not in exclude and not self._pinned(s)]
        if held:
            self._draining = min(held, key=lambda s: busy[s])

    def _make_room(self, nbytes: int) -> None:
        """Drop least recently used host copies until ``nbytes`` more fit under the bound (or none is left)."""
        while self._host and self.host_bytes + nbytes > self.host_bytes_limit:
            key, _ = self._host.popitem(last=False)
            self._drop_host_copy(self._records[key])
            if self.metrics:
                self.metrics.adapter_evicted("host", "lru")

    def _drop_host_copy(self, record: AdapterRecord) -> None:
        if record.weights is not None:
            self.host_bytes -= record.weights.nbytes
            record.weights = None
            self._host.pop(record.key, None)

    def _leave(
        self, records: list[AdapterRecord], reason: str, done: Future[None], retire: bool = False
    ) -> Future[None]:
        leaving = _Leaving(done, reason, len(records), retire)
        for record in records:
            record.leaving.append(leaving)
        for record in records:
            if record.refs == 0:
                self._settle(record)
        if not records:
            _resolve(done)
        return done

    def _settle(self, record: AdapterRecord) -> None:
        """No request holds ``record`` any more: it leaves if it retires or an eviction waits for it."""
        waiting = [w for w in record.leaving if not w.future.cancelled()]
        record.leaving = []
        if not (record.retiring or waiting):
            return
        reason = waiting[0].reason if waiting else "replaced"
        if record.slot >= 0:
            self.slots.clear(record.slot)
            self._off_slot(record)
            if self.metrics:
                self.metrics.adapter_evicted("device", reason)
        if record.weights is not None:
            self._drop_host_copy(record)
            if self.metrics:
                self.metrics.adapter_evicted("host", reason)
        del self._records[record.key]
        for w in waiting:
            w.remaining -= 1
            if w.remaining == 0:
                _resolve(w.future)


def _resolve(done: Future[None], error: Exception | None = None) -> bool:
    """Settle ``done`` unless its waiter cancelled it; whether it was settled."""
    if not done.set_running_or_notify_cancel():
        return False
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)
    return True
