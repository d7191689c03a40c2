"""Disk -> host memory on a thread of its own, so a cold adapter never stalls the running batch."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapters_store.backend import StoredAdapter
from adapters_store.base_model import BaseModelSpec
from adapters_store.errors import AdapterError, AdapterNotFound, StoreUnavailable
from adapters_store.validation import inspect
from server.lora.weights import AdapterWeights, load_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    """One finished read: the weights, or why there are none."""

    adapter: StoredAdapter
    weights: AdapterWeights | None
    seconds: float = 0.0
    error: str | None = None
    retryable: bool = False  # the failure says nothing lasting about the version (the store was down, ...)


def store_reader(
    locate: Callable[[StoredAdapter], Path], spec: BaseModelSpec, max_rank: int, pin_memory: bool
) -> Callable[[StoredAdapter], AdapterWeights]:
    """Reads a version's files (fetched by the store first if need be), checked against the served model.
    ``pin_memory``: page-locked host copies, so copies into CUDA slots are asynchronous."""

    def read(adapter: StoredAdapter) -> AdapterWeights:
        folder = locate(adapter)
        manifest, binding = inspect(folder, spec, max_rank)
        weights = load_weights(folder, manifest, binding)
        return weights.pinned() if pin_memory else weights

    return read


class DiskLoader:
    """Reads adapters one at a time; :meth:`finished` hands the results to the engine thread."""

    def __init__(self, read: Callable[[StoredAdapter], AdapterWeights], on_done: Callable[[], None]) -> None:
        self._read = read
        self._on_done = on_done
        self._jobs: queue.SimpleQueue[StoredAdapter | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[Loaded] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="loraplex-adapter-loader", daemon=True)
        self._thread.start()

    def start(self, adapter: StoredAdapter) -> None:
        self._jobs.put(adapter)

    def finished(self) -> list[Loaded]:
        out: list[Loaded] = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self._jobs.put(None)

    def _loop(self) -> None:
        while (adapter := self._jobs.get()) is not None:
            self._done.put(self._load(adapter))
            self._on_done()

    def _load(self, adapter: StoredAdapter) -> Loaded:
        started = time.perf_counter()
        try:
            return Loaded(adapter, self._read(adapter), time.perf_counter() - started)
        except (AdapterNotFound, StoreUnavailable) as exc:
            return Loaded(adapter, None, error=str(exc), retryable=True)
        except AdapterError as exc:
            return Loaded(adapter, None, error=str(exc))
        except Exception as exc:  # a broken file must fail its requests, not the loader
            log.exception("loading adapter %s failed", adapter.ref)
            return Loaded(adapter, None, error=f"loading failed: {exc}")
