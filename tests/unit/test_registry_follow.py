"""The registry follows changes made through other replicas in lookup order, whatever order lookups finish in."""

from __future__ import annotations

from pathlib import Path

from adapters_store.backend import StoredAdapter
from server.adapters.catalog import Catalog
from server.adapters.registry import AdapterRegistry

V1, V2 = (StoredAdapter("x", v * 64, Path("/cache") / v) for v in "12")


def registry() -> AdapterRegistry:
    # Only the bookkeeping is exercised: no store or engine is touched.
    return AdapterRegistry(None, Catalog(None, None, "base", 8), lambda command: None, 1, 1.0)


def test_a_lookup_that_finishes_late_does_not_undo_a_newer_one():
    r = registry()
    first, early, late = r._begin_lookup(), r._begin_lookup(), r._begin_lookup()
    r._observe(first, "x", V1)
    r._observe(late, "x", V2)  # a lookup that began later saw the re-upload ...
    r._observe(early, "x", V1)  # ... and one that began earlier finishes last: ignored
    assert r._current["x"] == (late, V2)
    assert r._changes == [(V1, V2)]  # one change to follow: V1 is retired, never V2


def test_a_delete_seen_by_a_lookup_is_followed_and_a_first_sight_is_not_a_change():
    r = registry()
    r._observe(r._begin_lookup(), "y", None)
    r._observe(r._begin_lookup(), "x", V1)
    assert r._changes == []
    r._observe(r._begin_lookup(), "x", None)
    assert r._changes == [(V1, None)]


def test_this_replicas_own_change_is_not_followed_again():
    r = registry()
    before = r._begin_lookup()  # a lookup that began before the upload ...
    r._set_current("x", V2)  # an upload through this replica (which retires what was there itself)
    r._observe(before, "x", V1)  # ... finishing late
    assert r._changes == [] and r._current["x"][1] == V2
