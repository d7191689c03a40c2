"""Adapter residency: disk -> host memory (LRU, bounded in bytes) -> device slots (LRU, ref-counted).

Owned by the engine thread. Disk reads happen on a loader thread so a cold
adapter never stalls the running batch; activation into a slot is a copy.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters_store.base_model import BaseModelSpec
from adapters_store.errors import AdapterError
from adapters_store.local import StoredAdapter
from adapters_store.peft_format import bind, read_manifest
from adapters_store.tensors import AdapterWeights, load_weights
from server.lora.slots import SlotPool

log = logging.getLogger(__name__)

AdapterKey = tuple[str, str]  # (name, version)


class Residency(enum.Enum):
    READY = "ready"  # on a device slot, reference taken
    LOADING = "loading"  # being read from disk
    NO_SLOT = "no_slot"  # in host memory but every slot is held by running requests
    FAILED = "failed"  # the adapter cannot be loaded; see the error


@dataclass(frozen=True)
class Acquired:
    state: Residency
    slot: int = -1
    error: str | None = None


class AdapterCache:
    """The host and device tiers, plus a background loader for the disk tier."""

    def __init__(
        self,
        spec: BaseModelSpec,
        slots: SlotPool,
        host_bytes: int,
        max_rank: int,
        dtype: torch.dtype,
        loader: Callable[[Path], AdapterWeights] | None = None,
        on_loaded: Callable[[], None] | None = None,
    ) -> None:
        self.spec, self.slots = spec, slots
        self.host_bytes_limit = host_bytes
        self.max_rank = max_rank
        self.dtype = dtype
        self._load = loader or self._load_from_disk
        self._on_loaded = on_loaded or (lambda: None)
        self._host: OrderedDict[AdapterKey, AdapterWeights] = OrderedDict()
        self.host_bytes = 0
        self._slot_of: dict[AdapterKey, int] = {}
        self._key_of: list[AdapterKey | None] = [None] * slots.num_slots
        self._refs = [0] * slots.num_slots
        self._idle: OrderedDict[int, None] = OrderedDict((s, None) for s in range(slots.num_slots))  # LRU first
        self._loading: set[AdapterKey] = set()
        self._failed: dict[AdapterKey, str] = {}
        self._done: queue.SimpleQueue[tuple[AdapterKey, AdapterWeights | None, str | None]] = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue[tuple[AdapterKey, Path] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loader_loop, name="loraplex-adapter-loader", daemon=True)
        self._thread.start()

    # -- engine-thread API -------------------------------------------------

    def tier(self, adapter: StoredAdapter) -> str:
        key = (adapter.name, adapter.version)
        if key in self._slot_of:
            return "device"
        return "host" if key in self._host else "disk"

    def acquire(self, adapter: StoredAdapter) -> Acquired:
        """Make ``adapter`` resident on a slot and take a reference, or say why not yet."""
        self.collect()
        key = (adapter.name, adapter.version)
        slot = self._slot_of.get(key)
        if slot is not None:
            self._take(slot)
            return Acquired(Residency.READY, slot)
        if key in self._failed:
            return Acquired(Residency.FAILED, error=self._failed[key])
        weights = self._host.get(key)
        if weights is None:
            if key not in self._loading:
                self._loading.add(key)
                self._jobs.put((key, adapter.path))
            return Acquired(Residency.LOADING)
        self._host.move_to_end(key)
        if not self._idle:
            return Acquired(Residency.NO_SLOT)
        slot, _ = self._idle.popitem(last=False)
        old = self._key_of[slot]
        if old is not None:
            del self._slot_of[old]
        self.slots.write(slot, weights)
        self._key_of[slot] = key
        self._slot_of[key] = slot
        self._take(slot)
        return Acquired(Residency.READY, slot)

    def release(self, slot: int) -> None:
        if slot < 0:
            return
        self._refs[slot] -= 1
        if self._refs[slot] < 0:
            raise RuntimeError(f"adapter slot {slot} released more often than acquired")
        if self._refs[slot] == 0:
            self._idle[slot] = None  # most recently used end

    def collect(self) -> None:
        """Move finished disk loads into the host tier."""
        while True:
            try:
                key, weights, error = self._done.get_nowait()
            except queue.Empty:
                return
            self._loading.discard(key)
            if weights is None:
                self._failed[key] = error or "unknown error"
                continue
            self._host[key] = weights
            self.host_bytes += weights.nbytes
            self._shrink_host(keep=key)

    @property
    def slots_in_use(self) -> int:
        return sum(1 for r in self._refs if r > 0)

    @property
    def loading(self) -> int:
        return len(self._loading)

    def close(self) -> None:
        self._jobs.put(None)

    # -- internals -----------------------------------------------------------

    def _take(self, slot: int) -> None:
        self._refs[slot] += 1
        self._idle.pop(slot, None)

    def _shrink_host(self, keep: AdapterKey) -> None:
        for key in list(self._host):
            if self.host_bytes <= self.host_bytes_limit:
                return
            if key == keep:
                continue
            self.host_bytes -= self._host.pop(key).nbytes

    def _load_from_disk(self, path: Path) -> AdapterWeights:
        binding = bind(read_manifest(path), self.spec, self.max_rank)
        return load_weights(path, binding, self.dtype)

    def _loader_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            key, path = job
            try:
                self._done.put((key, self._load(path), None))
            except AdapterError as exc:
                self._done.put((key, None, str(exc)))
            except Exception as exc:  # a broken file must fail its requests, not the loader
                log.exception("loading adapter %s failed", key[0])
                self._done.put((key, None, f"loading failed: {exc}"))
            self._on_loaded()
