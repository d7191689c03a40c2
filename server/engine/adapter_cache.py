"""Adapter residency: disk -> host memory (LRU, bounded in bytes) -> device slots (LRU, ref-counted).

Owned by the engine thread: every method but the loader's runs there. Disk
reads happen on a loader thread, so a cold adapter never stalls the running
batch; activation into a slot is a copy. A slot held by a running request or
by a pin is never reassigned; eviction takes the least recently used idle slot.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from adapters_store.backend import StoredAdapter
from adapters_store.base_model import BaseModelSpec
from adapters_store.errors import AdapterError, AdapterNotFound, StoreUnavailable
from adapters_store.validation import inspect
from server.lora.slots import SlotPool
from server.lora.weights import AdapterWeights, load_weights
from server.metrics import Metrics

log = logging.getLogger(__name__)

AdapterKey = tuple[str, str]  # (name, version)


class Residency(enum.Enum):
    READY = "ready"  # on a device slot, reference taken
    LOADING = "loading"  # being read from disk
    NO_SLOT = "no_slot"  # in host memory but every slot is held (or draining for an older waiter)
    FAILED = "failed"  # the adapter cannot be loaded; see the error


class PinLimitReached(Exception):
    """Pinning one more adapter would leave no slot for the others."""


@dataclass(frozen=True)
class Acquired:
    state: Residency
    slot: int = -1
    error: str | None = None
    retryable: bool = False  # the failure says nothing lasting about the adapter (e.g. the store was down)


@dataclass
class AdapterStats:
    """Per version, for the admin API: how often and how fast it was loaded."""

    loads: int = 0  # disk -> host
    activations: int = 0  # host -> device slot
    last_load_s: float | None = None
    last_activation_s: float | None = None


@dataclass(frozen=True)
class Residence:
    """Where one adapter version is right now (a snapshot for the admin API)."""

    tier: str  # device | host | disk
    state: str  # device | host | loading | failed | stored
    pinned: bool
    running: int  # running requests holding its slot
    stats: AdapterStats = field(default_factory=AdapterStats)
    error: str | None = None


class AdapterCache:
    """The host and device tiers, plus a background loader for the disk tier."""

    def __init__(
        self,
        spec: BaseModelSpec,
        slots: SlotPool,
        host_bytes: int,
        max_rank: int,
        locate: Callable[[StoredAdapter], Path] = lambda a: a.path,
        loader: Callable[[StoredAdapter], AdapterWeights] | None = None,
        on_loaded: Callable[[], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.spec, self.slots = spec, slots
        self.host_bytes_limit = host_bytes
        self.max_rank = max_rank
        self._locate = locate
        self._load = loader or self._load_from_disk
        self._on_loaded = on_loaded or (lambda: None)
        self.metrics = metrics
        self._host: OrderedDict[AdapterKey, AdapterWeights] = OrderedDict()  # LRU first
        self.host_bytes = 0
        self._slot_of: dict[AdapterKey, int] = {}
        self._key_of: list[AdapterKey | None] = [None] * slots.num_slots
        self._refs = [0] * slots.num_slots  # running requests + a pin
        self._idle: OrderedDict[int, None] = OrderedDict((s, None) for s in range(slots.num_slots))  # LRU first
        self._pinned: dict[AdapterKey, int] = {}
        self._draining: int | None = None  # a held slot refusing new requests so an older waiter gets it
        self._loading: set[AdapterKey] = set()
        self._failed: dict[AdapterKey, str] = {}
        self._retry: set[AdapterKey] = set()  # failures that say nothing lasting about the version
        self._stats: dict[AdapterKey, AdapterStats] = {}
        # (key, weights, error, seconds, worth retrying)
        self._done: queue.SimpleQueue[tuple[AdapterKey, AdapterWeights | None, str | None, float, bool]] = (
            queue.SimpleQueue()
        )
        self._jobs: queue.SimpleQueue[StoredAdapter | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loader_loop, name="loraplex-adapter-loader", daemon=True)
        self._thread.start()

    # -- requests -------------------------------------------------------------

    def tier(self, adapter: StoredAdapter) -> str:
        if adapter.key in self._slot_of:
            return "device"
        return "host" if adapter.key in self._host else "disk"

    def acquire(self, adapter: StoredAdapter, holding: Collection[int] = (), new_slot: bool = True) -> Acquired:
        """Make ``adapter`` resident on a slot and take a reference, or say why not yet.

        ``holding``: slots the caller already took for the same request (a
        composition); they are never the one drained for it. ``new_slot``
        False: only an adapter already on a slot is taken (an older request
        waits for the free ones); a load from disk still starts.
        """
        self.collect()
        key = adapter.key
        slot = self._slot_of.get(key)
        if slot is not None:
            if slot == self._draining:
                return Acquired(Residency.NO_SLOT)
            self._take(slot)
            return Acquired(Residency.READY, slot)
        if key in self._failed:
            error = self._failed[key]
            retryable = key in self._retry
            if retryable:  # the store was down or the version gone: this request fails, the next tries again
                self._retry.discard(key)
                del self._failed[key]
            return Acquired(Residency.FAILED, error=error, retryable=retryable)
        weights = self._host.get(key)
        if weights is None:
            self.fetch(adapter)
            return Acquired(Residency.LOADING)
        self._host.move_to_end(key)
        if not new_slot or not self._idle:
            if new_slot:
                self._pick_draining(holding)
            if self.metrics:
                self.metrics.slot_wait()
            return Acquired(Residency.NO_SLOT)
        slot, _ = self._idle.popitem(last=False)
        if self._unmap(slot) and self.metrics:
            self.metrics.adapter_evicted("device", "lru")
        started = time.perf_counter()
        try:
            self.slots.write(slot, weights)
        except Exception:
            self._idle[slot] = None  # the slot stays usable (write zeroes what it does not copy)
            if self.metrics:
                self.metrics.adapter_loaded("device", time.perf_counter() - started, ok=False)
            raise
        stats = self._stats.setdefault(key, AdapterStats())
        stats.activations += 1
        stats.last_activation_s = time.perf_counter() - started
        if self.metrics:
            self.metrics.adapter_loaded("device", stats.last_activation_s, ok=True)
        self._key_of[slot] = key
        self._slot_of[key] = slot
        self._take(slot)
        return Acquired(Residency.READY, slot)

    def fetch(self, adapter: StoredAdapter) -> None:
        """Start reading ``adapter`` from disk into host memory if it is in neither tier, without a slot.

        For requests that are queued behind full batches: their adapters load while they wait,
        so they can take a slot as soon as one frees instead of queueing for the loader then.
        """
        self.collect()
        key = adapter.key
        if key in self._slot_of or key in self._host or key in self._loading or key in self._failed:
            return
        self._loading.add(key)
        self._jobs.put(adapter)

    def release(self, slot: int) -> None:
        if slot < 0:
            return
        self._refs[slot] -= 1
        if self._refs[slot] < 0:
            raise RuntimeError(f"adapter slot {slot} released more often than acquired")
        if self._refs[slot] == 0:
            self._idle[slot] = None  # most recently used end
            if self._draining == slot:
                self._draining = None

    # -- operators ------------------------------------------------------------

    def pin(self, adapter: StoredAdapter) -> Acquired:
        """Like :meth:`acquire`, but the reference is kept until :meth:`unpin`; one slot always stays unpinned."""
        if adapter.key in self._pinned:
            return Acquired(Residency.READY, self._pinned[adapter.key])
        if len(self._pinned) >= self.slots.num_slots - 1:
            raise PinLimitReached(
                f"{len(self._pinned)} of {self.slots.num_slots} slots are pinned already; "
                "one must stay free for other adapters (raise --max-loras or unpin one)"
            )
        got = self.acquire(adapter)
        if got.state is Residency.READY:
            self._pinned[adapter.key] = got.slot
        return got

    def prefetch(self, adapter: StoredAdapter) -> Acquired:
        """Bring ``adapter`` onto a slot without holding it (it stays until LRU eviction)."""
        got = self.acquire(adapter)
        if got.state is Residency.READY:
            self.release(got.slot)
        return got

    def pinned(self, name: str) -> bool:
        return any(k[0] == name for k in self._pinned)

    def unpin(self, name: str) -> bool:
        keys = [k for k in self._pinned if k[0] == name]
        for key in keys:
            self.release(self._pinned.pop(key))
        return bool(keys)

    def evict(self, name: str, version: str | None = None, reason: str = "admin") -> int:
        """Drop ``name`` (one version, or all) from host memory and device slots; unpins it.

        Returns how many running requests hold it: if any, nothing is changed.
        ``reason`` is for the metrics: ``admin``, ``delete`` or ``replaced``.
        """
        keys = {k for k in (*self._slot_of, *self._host, *self._failed) if k[0] == name}
        keys = {k for k in keys if version is None or k[1] == version}
        running = sum(self._running(self._slot_of[k]) for k in keys if k in self._slot_of)
        if running:
            return running
        for key in keys:
            if key in self._pinned:
                self.release(self._pinned.pop(key))
            slot = self._slot_of.get(key)
            if slot is not None:
                self._unmap(slot)
                self.slots.clear(slot)
                self._idle.move_to_end(slot, last=False)  # first to be reused
                if self.metrics:
                    self.metrics.adapter_evicted("device", reason)
            if key in self._host:
                self.host_bytes -= self._host.pop(key).nbytes
                if self.metrics:
                    self.metrics.adapter_evicted("host", reason)
            self._failed.pop(key, None)
            self._retry.discard(key)
            self._stats.pop(key, None)
        return 0

    def residence(self) -> dict[AdapterKey, Residence]:
        """Every version the cache knows of, and where it is."""
        out: dict[AdapterKey, Residence] = {}
        for key in {*self._slot_of, *self._host, *self._loading, *self._failed, *self._stats}:
            slot = self._slot_of.get(key)
            if slot is not None:
                tier, state = "device", "device"
            elif key in self._host:
                tier, state = "host", "host"
            else:
                tier = "disk"
                state = "failed" if key in self._failed else "loading" if key in self._loading else "stored"
            out[key] = Residence(
                tier=tier,
                state=state,
                pinned=key in self._pinned,
                running=self._running(slot) if slot is not None else 0,
                stats=self._stats.get(key, AdapterStats()),
                error=self._failed.get(key),
            )
        return out

    # -- bookkeeping ----------------------------------------------------------

    def collect(self) -> None:
        """Move finished disk loads into the host tier."""
        while True:
            try:
                key, weights, error, seconds, retry = self._done.get_nowait()
            except queue.Empty:
                return
            self._loading.discard(key)
            if self.metrics:
                self.metrics.adapter_loaded("host", seconds, ok=weights is not None)
            if weights is None:
                self._failed[key] = error or "unknown error"
                if retry:
                    self._retry.add(key)
                continue
            stats = self._stats.setdefault(key, AdapterStats())
            stats.loads += 1
            stats.last_load_s = seconds
            self._make_room(weights.nbytes)
            self._host[key] = weights
            self.host_bytes += weights.nbytes

    @property
    def slots_in_use(self) -> int:
        return sum(1 for r in self._refs if r > 0)

    @property
    def loading(self) -> int:
        return len(self._loading)

    def close(self) -> None:
        self._jobs.put(None)

    # -- internals ------------------------------------------------------------

    def _running(self, slot: int) -> int:
        key = self._key_of[slot]
        return self._refs[slot] - (1 if key in self._pinned else 0)

    def _take(self, slot: int) -> None:
        self._refs[slot] += 1
        self._idle.pop(slot, None)

    def _unmap(self, slot: int) -> bool:
        """Forget which adapter ``slot`` holds; whether it held one."""
        old = self._key_of[slot]
        if old is None:
            return False
        del self._slot_of[old]
        self._key_of[slot] = None
        return True

    def capacity(self, adapters: Collection[StoredAdapter]) -> int:
        """Slots ``adapters`` could ever hold together: those not pinned by other adapters."""
        keys = {a.key for a in adapters}
        return self.slots.num_slots - sum(1 for key in self._pinned if key not in keys)

    def _pick_draining(self, exclude: Collection[int] = ()) -> None:
        """Every slot is held: stop admitting onto the one closest to free, so the waiter gets it next."""
        if self._draining is not None:
            return
        held = [
            s
            for s in range(self.slots.num_slots)
            if self._key_of[s] not in self._pinned and self._refs[s] > 0 and s not in exclude
        ]
        if held:
            self._draining = min(held, key=lambda s: self._refs[s])

    def _make_room(self, nbytes: int) -> None:
        """Evict least recently used host copies until ``nbytes`` more fit under the bound (or nothing is left)."""
        while self._host and self.host_bytes + nbytes > self.host_bytes_limit:
            _, old = self._host.popitem(last=False)
            self.host_bytes -= old.nbytes
            if self.metrics:
                self.metrics.adapter_evicted("host", "lru")

    def _load_from_disk(self, adapter: StoredAdapter) -> AdapterWeights:
        folder = self._locate(adapter)
        manifest, binding = inspect(folder, self.spec, self.max_rank)
        weights = load_weights(folder, manifest, binding)
        return weights.pinned() if self.slots.device.type == "cuda" else weights  # async copies into slots

    def _loader_loop(self) -> None:
        while True:
            adapter = self._jobs.get()
            if adapter is None:
                return
            started = time.perf_counter()
            try:
                self._done.put((adapter.key, self._load(adapter), None, time.perf_counter() - started, False))
            except (AdapterNotFound, StoreUnavailable) as exc:
                self._done.put((adapter.key, None, str(exc), 0.0, True))
            except AdapterError as exc:
                self._done.put((adapter.key, None, str(exc), 0.0, False))
            except Exception as exc:  # a broken file must fail its requests, not the loader
                log.exception("loading adapter %s failed", adapter.name)
                self._done.put((adapter.key, None, f"loading failed: {exc}", 0.0, False))
            self._on_loaded()
