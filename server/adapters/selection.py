"""What a request runs with: the base model (no terms), one adapter (one term of weight 1), or a weighted sum.

One type from the route to the kernel's metadata: the route builds it, the
engine request carries it, the scheduler makes each term's adapter resident
and the runner turns the terms into (slot, weight) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapters_store.backend import StoredAdapter


@dataclass(frozen=True)
class Term:
    """``weight * scale * B A x`` of ``adapter``."""

    adapter: StoredAdapter
    weight: float = 1.0


@dataclass(frozen=True)
class Selection:
    terms: tuple[Term, ...] = ()

    def __post_init__(self) -> None:
        names = [t.adapter.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ValueError("a selection names an adapter twice")

    @classmethod
    def of(cls, adapter: StoredAdapter | None) -> Selection:
        """The base model (None) or one adapter at full weight."""
        return cls(() if adapter is None else (Term(adapter),))

    @property
    def adapters(self) -> tuple[StoredAdapter, ...]:
        return tuple(t.adapter for t in self.terms)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(t.weight for t in self.terms)

    @property
    def kind(self) -> str:
        """``base``, ``adapter`` or ``composed``: the metrics' label."""
        if not self.terms:
            return "base"
        return "adapter" if self.single is not None else "composed"

    @property
    def single(self) -> StoredAdapter | None:
        """The adapter when the selection is one adapter at full weight (the plain path), else None."""
        if len(self.terms) == 1 and self.terms[0].weight == 1.0:
            return self.terms[0].adapter
        return None

    @property
    def kv_salt(self) -> bytes:
        """What computes this selection's K/V, for the prefix cache's keys: each term's version digest and exact
        weight, in order; empty for the base model. Never a name: a name's next version is other weights."""
        return ";".join(f"{t.adapter.version}*{float(t.weight).hex()}" for t in self.terms).encode()

    @property
    def refs(self) -> str:
        """``name@version`` of each term, comma-separated (the ``x-loraplex-adapter`` header)."""
        return ",".join(a.ref for a in self.adapters)
