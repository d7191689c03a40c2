"""A residency on a tiny slot pool, with a loader the test controls (no thread, no files)."""

from __future__ import annotations

from pathlib import Path

import torch

from adapters_store.backend import StoredAdapter
from server.adapters.loader import Loaded
from server.adapters.residency import Residency
from server.lora.slots import SlotPool
from server.lora.weights import AdapterWeights

MODULE = "model.layers.0.self_attn.q_proj"


def weights(value: float, rank: int = 2) -> AdapterWeights:
    return AdapterWeights(
        a={MODULE: torch.full((rank, 8), value)}, bt={MODULE: torch.full((rank, 8), value)}, scale={MODULE: 1.0}
    )


def adapter(name: str, version: str = "v1") -> StoredAdapter:
    return StoredAdapter(name, version, Path("/nonexistent") / name)


class ManualLoader:
    """Loads finish when the residency next looks, unless named in ``blocked`` (they wait until unblocked).
    ``broken`` fail for good; ``store_down`` fail for a reason that may pass. Each adapter's weights are
    filled with the length of its name."""

    def __init__(self) -> None:
        self.blocked: set[str] = set()
        self.broken: set[str] = set()
        self.store_down: set[str] = set()
        self.started: list[str] = []  # names, in the order their reads began
        self._queue: list[StoredAdapter] = []

    def start(self, adapter: StoredAdapter) -> None:
        self.started.append(adapter.name)
        self._queue.append(adapter)

    def finished(self) -> list[Loaded]:
        done = [a for a in self._queue if a.name not in self.blocked]
        self._queue = [a for a in self._queue if a.name in self.blocked]
        return [self._result(a) for a in done]

    def close(self) -> None:
        pass

    def _result(self, a: StoredAdapter) -> Loaded:
        if a.name in self.broken:
            return Loaded(a, None, error=f"{a.name} is broken")
        if a.name in self.store_down:
            return Loaded(a, None, error="adapter store s3://b: could not download", retryable=True)
        return Loaded(a, weights(float(len(a.name))), 0.001)


def residency(slots: int = 2, host_bytes: int = 1 << 20) -> Residency:
    pool = SlotPool({MODULE: (8, 8)}, slots, 4, torch.float32, torch.device("cpu"))
    return Residency(pool, host_bytes, ManualLoader())
