"""The residency's records with a loader the test controls: states, LRU slots, references, host bound, pins,
evictions and retirements resolved by futures, failures."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch

from adapters_store.errors import AdapterNotFound, InvalidAdapter
from server.adapters.errors import LoadFailed, PinLimitReached
from server.adapters.loader import DiskLoader
from server.adapters.residency import Outcome, Residency, State
from tests.helpers.residency import MODULE, adapter, residency, weights

NOBODY: Counter[int] = Counter()  # no running request on any slot


def ready(r: Residency, name: str, busy=NOBODY) -> int:
    got = r.acquire(adapter(name), busy)
    assert got.outcome is Outcome.READY, got
    return got.slot


def pinned(r: Residency, name: str) -> bool:
    return any(v.pinned for v in r.snapshot(NOBODY).records.values() if v.adapter.name == name)


def state(r: Residency, name: str, version: str = "v1") -> State | None:
    view = r.snapshot(NOBODY).records.get(adapter(name, version).key)
    return view.state if view else None


def test_a_cold_adapter_is_read_then_lands_in_a_slot():
    r = residency()
    r.loader.blocked.add("a")
    assert r.tier(adapter("a")) == "disk"
    assert r.acquire(adapter("a"), NOBODY).outcome is Outcome.LOADING and state(r, "a") is State.LOADING
    r.loader.blocked.clear()
    slot = ready(r, "a")
    assert r.tier(adapter("a")) == "device" and state(r, "a") is State.DEVICE
    m = r.slots.modules[MODULE]
    assert m.host_rank[slot] == 2 and torch.all(m.a[slot, :2] == 1.0) and torch.all(m.a[slot, 2:] == 0)


def test_busy_slots_are_never_reused_and_the_least_recently_used_idle_one_is():
    r = residency(slots=2)
    sa, sb = ready(r, "a"), ready(r, "b")  # both idle now; a is the least recently used
    sc = ready(r, "cc")
    assert sc == sa and state(r, "a") is State.HOST and state(r, "b") is State.DEVICE
    busy = Counter({sb: 1, sc: 2})  # running requests on both slots: a third adapter waits, nothing is evicted
    assert r.acquire(adapter("b"), busy).slot == sb
    assert r.acquire(adapter("a"), busy).outcome is Outcome.NO_SLOT
    assert ready(r, "a", Counter({sb: 1})) == sc
    assert torch.all(r.slots.modules[MODULE].a[sc, :2] == 1.0)  # a's weights; cc's are gone


def test_a_slot_whose_adapter_some_request_holds_is_reused_last():
    r = residency(slots=2)
    sa = ready(r, "a")
    ready(r, "b")
    r.hold(adapter("a"))  # a waiting request holds a (not running: its slot is not busy)
    ready(r, "a")  # a is the most recently used now ...
    r.release(adapter("a"))
    r.hold(adapter("b"))
    assert ready(r, "ccc") == sa  # ... but b is held, so a's slot is taken
    r.release(adapter("b"))


def test_the_host_tier_stays_under_its_bound():
    one = weights(1.0).nbytes
    r = residency(slots=1, host_bytes=2 * one)
    for name in ["a", "b", "c", "d"]:
        ready(r, name)
    assert r.host_bytes == 2 * one
    snapshot = r.snapshot(NOBODY)
    assert {k[0]: v.state for k, v in snapshot.records.items()} == {
        "a": State.STORED, "b": State.STORED, "c": State.HOST, "d": State.DEVICE
    }


def test_a_broken_adapter_fails_without_touching_the_others_and_stays_failed():
    r = residency()
    r.loader.broken.add("bad")
    got = r.acquire(adapter("bad"), NOBODY)
    assert got.outcome is Outcome.FAILED and "broken" in got.error and not got.retryable
    assert ready(r, "a") >= 0
    assert r.acquire(adapter("bad"), NOBODY).outcome is Outcome.FAILED and state(r, "bad") is State.FAILED
    assert r.loader.started == ["bad", "a"]  # not read again


def test_a_store_outage_fails_one_request_and_the_next_one_tries_again():
    r = residency()
    r.loader.store_down.add("a")
    got = r.acquire(adapter("a"), NOBODY)
    assert got.outcome is Outcome.FAILED and got.retryable and "could not download" in got.error
    r.loader.store_down.clear()
    assert ready(r, "a") >= 0 and r.loader.started == ["a", "a"]


def test_references_count_requests_and_cannot_go_below_zero():
    r = residency()
    record = r.hold(adapter("a"))
    r.hold(adapter("a"))
    assert record.refs == 2 and r.snapshot(NOBODY).in_flight("a") == 2
    r.release(adapter("a"))
    r.release(adapter("a"))
    with pytest.raises(RuntimeError, match="released more often than held"):
        r.release(adapter("a"))


def test_pins_survive_churn_and_one_slot_stays_unpinned():
    r = residency(slots=3)
    r.load(adapter("p"), True, NOBODY).result(0)
    assert pinned(r, "p") and r.snapshot(NOBODY).slots_in_use == 1
    for name in ["x1", "x22", "x333", "x4444"]:
        ready(r, name)
    assert state(r, "p") is State.DEVICE
    r.load(adapter("q"), True, NOBODY).result(0)
    with pytest.raises(PinLimitReached, match="2 of 3 slots are pinned"):
        r.load(adapter("x1"), True, NOBODY).result(0)
    assert r.unpin("q") and not pinned(r, "q")
    ready(r, "x1")
    ready(r, "x22")  # q was unpinned: its slot is reused, p's never is
    assert state(r, "p") is State.DEVICE and state(r, "q") is State.HOST


def test_a_load_waits_for_a_free_slot_and_is_resolved_when_one_frees():
    r = residency(slots=1)
    s = ready(r, "busy")
    done = r.load(adapter("b"), False, Counter({s: 1}))
    assert not done.done()
    r.retry_loads(Counter({s: 1}))
    assert not done.done()
    r.retry_loads(NOBODY)  # the running request finished
    assert done.result(0) is None and state(r, "b") is State.DEVICE
    r.loader.broken.add("bad")
    with pytest.raises(LoadFailed, match="broken"):
        r.load(adapter("bad"), False, NOBODY).result(0)
    cancelled = r.load(adapter("c"), False, Counter({s: 1}))
    cancelled.cancel()
    r.retry_loads(NOBODY)
    assert state(r, "c") is State.HOST  # read, but the cancelled load took no slot


def test_evict_waits_until_no_request_holds_it_then_clears_every_tier():
    r = residency(slots=2)
    slot = ready(r, "a")
    r.load(adapter("a"), True, NOBODY).result(0)
    r.hold(adapter("a"))
    done = r.evict("a")
    assert not done.done() and state(r, "a") is State.DEVICE and pinned(r, "a")  # a request holds it
    r.release(adapter("a"))
    assert done.result(0) is None
    assert state(r, "a") is None and not pinned(r, "a") and r.host_bytes == 0
    m = r.slots.modules[MODULE]
    assert m.host_rank[slot] == 0 and torch.all(m.a[slot] == 0) and r.snapshot(NOBODY).slots_in_use == 0


def test_a_cancelled_eviction_leaves_the_adapter_as_it_was():
    r = residency()
    ready(r, "a")
    r.hold(adapter("a"))
    done = r.evict("a")
    done.cancel()  # the operator's wait timed out (409)
    r.release(adapter("a"))
    assert state(r, "a") is State.DEVICE


def test_a_retired_version_serves_its_requests_then_leaves():
    r = residency()
    old, new = adapter("a", "v1"), adapter("a", "v2")
    r.load(old, True, NOBODY).result(0)
    r.hold(old)  # a running request on the old version
    done = r.retire(old, "replaced")
    assert state(r, "a", "v1") is State.RETIRING and not pinned(r, "a")  # unpinned at once
    got = r.acquire(old, NOBODY)
    assert got.outcome is Outcome.READY  # its requests still run on it
    busy = Counter({got.slot: 1})
    assert r.acquire(new, busy).outcome is Outcome.READY and r.acquire(new, busy).slot != got.slot
    assert not done.done()
    r.release(old)
    assert done.result(0) is None and state(r, "a", "v1") is None and state(r, "a", "v2") is State.DEVICE
    snapshot = r.snapshot(NOBODY)
    assert snapshot.host_bytes == weights(1.0).nbytes and not snapshot.held_versions()


def test_a_retiring_version_that_is_current_again_stays_and_keeps_a_new_pin():
    r = residency()
    v1 = adapter("a", "v1")
    ready(r, "a")
    r.hold(v1)  # an old request still runs on it
    done = r.retire(v1, "replaced")  # re-uploaded with other content ...
    r.revive(v1)  # ... then with this content again
    assert done.result(0) is None and state(r, "a") is State.DEVICE  # the retirement's wait is over
    r.load(v1, True, NOBODY).result(0)
    r.release(v1)
    assert state(r, "a") is State.DEVICE and pinned(r, "a")  # not dropped when its old request ended


def test_a_waiter_gets_the_slot_closest_to_free():
    r = residency(slots=2)
    sa, sb = ready(r, "a"), ready(r, "bb")
    busy = Counter({sa: 2, sb: 1})
    assert r.acquire(adapter("ccc"), busy).outcome is Outcome.NO_SLOT
    # bb's slot drains: new requests for bb wait, a still admits.
    assert r.acquire(adapter("bb"), busy).outcome is Outcome.NO_SLOT
    assert r.acquire(adapter("a"), busy).slot == sa
    assert r.acquire(adapter("ccc"), Counter({sa: 2})).slot == sb  # bb's requests finished


def test_read_ahead_fills_host_memory_without_a_slot_and_only_once():
    r = residency(slots=1)
    s = ready(r, "held")
    r.loader.blocked.add("queued")
    r.read_ahead(adapter("queued"))
    r.read_ahead(adapter("queued"))  # already loading: no second read
    r.loader.blocked.clear()
    r.read_ahead(adapter("queued"))
    assert r.tier(adapter("queued")) == "host" and r.loader.started == ["held", "queued"]
    assert r.acquire(adapter("queued"), Counter({s: 1})).outcome is Outcome.NO_SLOT
    assert r.acquire(adapter("queued"), NOBODY).outcome is Outcome.READY  # straight from host memory
    assert r.loader.started == ["held", "queued"]


def test_the_disk_loader_reports_failures_by_kind():
    outcomes = {"gone": AdapterNotFound("version gone"), "bad": InvalidAdapter("bad tensor"), "oops": OSError("io")}

    def read(a):
        if a.name in outcomes:
            raise outcomes[a.name]
        return weights(1.0)

    finished = threading.Semaphore(0)
    loader = DiskLoader(read, finished.release)
    for name in ["gone", "bad", "oops", "ok"]:
        loader.start(adapter(name))
    for _ in range(4):
        assert finished.acquire(timeout=10)
    loader.close()
    results = {d.adapter.name: d for d in loader.finished()}
    assert results["gone"].retryable and not results["bad"].retryable and "io" in results["oops"].error
    assert results["ok"].weights is not None and results["ok"].error is None
