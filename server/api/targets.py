"""What a generation request runs with: the base model, one adapter, or a weighted composition.

Resolved from ``model`` and the ``adapters`` extension, checked against the
caller's API key before anything is looked up (a key outside its adapters gets
403 whether or not the adapter exists). The lookup's lease holds the versions
until the request's engine requests are submitted (they hold them from then on).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from adapters_store.errors import AdapterError
from server.adapters.registry import AdapterRegistry, Lease
from server.adapters.selection import Selection, Term
from server.api.errors import ApiError, adapter_error
from server.api.keys import ApiKey
from server.api.schemas import AdapterTerm


@dataclass(frozen=True)
class Target:
    selection: Selection
    lease: Lease

    def headers(self, tiers: tuple[str, ...]) -> dict[str, str]:
        """``x-loraplex-adapter`` (name@version, comma-separated when composed) and where each was found."""
        if not self.selection.terms:
            return {}
        return {
            "x-loraplex-adapter": self.selection.refs,
            "x-loraplex-adapter-cache": ",".join(tiers or ("disk",) * len(self.selection.terms)),
        }


async def resolve_target(
    registry: AdapterRegistry,
    key: ApiKey | None,
    model: str,
    terms: list[AdapterTerm] | None,
    max_composed: int,
) -> Target:
    named = registry.adapter_named_by(model)
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
    # File reads and hashing on first sight of an adapter version: off the event loop.
    lease = await _lease(registry, names, param)
    weights = [t.weight for t in terms] if terms else [1.0] * len(names)
    return Target(Selection(tuple(Term(a, w) for a, w in zip(lease.adapters, weights, strict=True))), lease)


async def _lease(registry: AdapterRegistry, names: list[str], param: str) -> Lease:
    """A lease taken on a worker thread; if the caller is cancelled meanwhile, it is released when taken."""
    task = asyncio.ensure_future(asyncio.to_thread(registry.lease, names))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(lambda t: t.result().release() if not t.cancelled() and not t.exception() else None)
        raise
    except AdapterError as exc:
        raise adapter_error(exc, param) from None
    finally:
        registry.follow_changes()  # what this lookup (or another) found changed in the store
