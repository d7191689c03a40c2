"""What a generation request runs with: the base model, one adapter, or a weighted composition.

Resolved from ``model`` and the ``adapters`` extension, checked against the
caller's API key before anything is looked up (a key outside its adapters gets
403 whether or not the adapter exists), and leased until the engine is done
with every request made from it.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from adapters_store.backend import StoredAdapter
from server.api.errors import ApiError
from server.api.keys import ApiKey
from server.api.registry import AdapterRegistry, Lease
from server.api.schemas import AdapterTerm
from server.engine.request import WeightedAdapter


@dataclass
class Target:
    adapter: StoredAdapter | None = None
    composition: tuple[WeightedAdapter, ...] = ()
    leases: list[Lease] = field(default_factory=list)
    _holders: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def adapters(self) -> tuple[StoredAdapter, ...]:
        return (self.adapter,) if self.adapter else tuple(t.adapter for t in self.composition)

    def hold(self, n: int) -> None:
        """``n`` engine requests now share the leases; each calls :meth:`done` once."""
        with self._lock:
            self._holders += n
        if n == 0:
            self.release()

    def done(self) -> None:
        """One engine request finished (called on the engine thread); the last one releases the leases."""
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            self.release()

    def release(self) -> None:
        for lease in self.leases:
            lease.release()

    def headers(self, tiers: str | None) -> dict[str, str]:
        """``x-loraplex-adapter`` (name@version, comma-separated when composed) and where each was found."""
        if not self.adapters:
            return {}
        return {
            "x-loraplex-adapter": ",".join(a.ref for a in self.adapters),
            "x-loraplex-adapter-cache": tiers or ",".join("disk" for _ in self.adapters),
        }


async def resolve_target(
    registry: AdapterRegistry,
    key: ApiKey | None,
    model: str,
    terms: list[AdapterTerm] | None,
    max_composed: int,
) -> Target:
    named = registry.base_alias(model)
    if terms:
        if named is not None:
            raise ApiError(
                400,
                f"`model` must name the base model ({registry.base_name!r}) when `adapters` composes adapters; "
                f"got {model[:200]!r}",
                "invalid_composition",
                "model",
            )
        if len(terms) > max_composed:
            raise ApiError(
                400,
                f"`adapters` lists {len(terms)} adapters; at most {max_composed} can be composed",
                "invalid_composition",
                "adapters",
            )
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise ApiError(400, "`adapters` lists an adapter twice", "invalid_composition", "adapters")
        param = "adapters"
    else:
        names = [] if named is None else [named]
        param = "model"
    for name in names:
        if key is not None and not key.allows(name):
            raise ApiError(403, f"this API key may not use adapter {name[:200]!r}", "adapter_not_allowed", param)
    leases: list[Lease] = []
    try:
        for name in names:
            # File reads and hashing on first sight of an adapter version: off the event loop.
            leases.append(await _lease(registry, name, param))
    except BaseException:
        for lease in leases:
            lease.release()
        raise
    if not terms:
        return Target(adapter=leases[0].adapter if leases else None, leases=leases)
    if len(terms) == 1 and terms[0].weight == 1.0:  # the plain path: one adapter, full weight
        return Target(adapter=leases[0].adapter, leases=leases)
    composition = tuple(WeightedAdapter(lease.adapter, t.weight) for lease, t in zip(leases, terms, strict=True))
    return Target(composition=composition, leases=leases)


async def _lease(registry: AdapterRegistry, name: str, param: str) -> Lease:
    """A lease taken on a worker thread; if the caller is cancelled meanwhile, it is released when taken."""
    task = asyncio.ensure_future(asyncio.to_thread(registry.lease, name, param))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(lambda t: t.result().release() if not t.cancelled() and not t.exception() else None)
        raise
    finally:
        registry.follow_changes()  # what this lookup (or another) found changed in the store
