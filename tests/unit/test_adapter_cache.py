"""The adapter cache's tiers with a fake loader: LRU slots, references, host bound, failures."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from adapters_store.backend import StoredAdapter
from adapters_store.base_model import BaseModelSpec
from adapters_store.errors import AdapterNotFound, InvalidAdapter, StoreUnavailable
from server.engine.adapter_cache import AdapterCache, PinLimitReached, Residency
from server.lora.slots import SlotPool
from server.lora.weights import AdapterWeights

MODULE = "model.layers.0.self_attn.q_proj"


def weights(value: float, rank: int = 2) -> AdapterWeights:
    return AdapterWeights(
        a={MODULE: torch.full((rank, 8), value)}, bt={MODULE: torch.full((rank, 8), value)}, scale={MODULE: 1.0}
    )


def make(slots: int = 2, host_bytes: int = 1 << 20, broken=()) -> AdapterCache:
    spec = BaseModelSpec("llama", {MODULE: (8, 8)}, frozenset())
    pool = SlotPool({MODULE: (8, 8)}, slots, 4, torch.float32, torch.device("cpu"))

    def load(stored: StoredAdapter) -> AdapterWeights:
        if stored.name in broken:
            raise InvalidAdapter(f"{stored.name} is broken")
        return weights(float(len(stored.name)))

    return AdapterCache(spec, pool, host_bytes, 4, loader=load)


def adapter(name: str) -> StoredAdapter:
    return StoredAdapter(name, "v1", Path("/store") / name)


def ready(cache: AdapterCache, name: str) -> int:
    deadline = time.monotonic() + 10
    while (got := cache.acquire(adapter(name))).state is not Residency.READY:
        assert got.state is Residency.LOADING, got
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return got.slot


def test_cold_adapter_loads_off_thread_then_lands_in_a_slot():
    cache = make()
    assert cache.tier(adapter("a")) == "disk"
    assert cache.acquire(adapter("a")).state is Residency.LOADING
    slot = ready(cache, "a")
    assert cache.tier(adapter("a")) == "device"
    m = cache.slots.modules[MODULE]
    assert m.host_rank[slot] == 2 and torch.all(m.a[slot, :2] == 1.0) and torch.all(m.a[slot, 2:] == 0)


def test_least_recently_used_idle_slot_is_evicted_and_held_slots_never_are():
    cache = make(slots=2)
    sa, sb = ready(cache, "a"), ready(cache, "b")
    cache.release(sa)
    cache.release(sb)  # both idle; a is the least recently used
    sc = ready(cache, "cc")
    assert sc == sa and cache.tier(adapter("a")) == "host" and cache.tier(adapter("b")) == "device"
    # b and cc now held: a third adapter must wait, not evict.
    assert cache.acquire(adapter("b")).slot == sb
    assert cache.acquire(adapter("a")).state is Residency.NO_SLOT
    cache.release(sc)
    assert cache.acquire(adapter("a")).slot == sc
    assert torch.all(cache.slots.modules[MODULE].a[sc, :2] == 1.0)  # a's weights, cc's cleared


def test_host_tier_stays_under_its_bound():
    one = weights(1.0).nbytes
    cache = make(slots=1, host_bytes=2 * one)
    for name in ["a", "b", "c", "d"]:
        cache.release(ready(cache, name))
    assert cache.host_bytes <= 2 * one


def test_a_broken_adapter_fails_without_touching_the_others():
    cache = make(broken={"bad"})
    cache.acquire(adapter("bad"))
    deadline = time.monotonic() + 10
    while (got := cache.acquire(adapter("bad"))).state is Residency.LOADING:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert got.state is Residency.FAILED and "broken" in got.error
    assert ready(cache, "a") >= 0 and cache.slots_in_use == 1
    assert cache.acquire(adapter("bad")).state is Residency.FAILED  # remembered: a broken version stays broken


def settle(cache: AdapterCache, name: str):
    deadline = time.monotonic() + 10
    while (got := cache.acquire(adapter(name))).state is Residency.LOADING:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return got


def test_a_store_outage_fails_the_waiting_request_and_the_next_one_tries_again():
    spec = BaseModelSpec("llama", {MODULE: (8, 8)}, frozenset())
    pool = SlotPool({MODULE: (8, 8)}, 2, 4, torch.float32, torch.device("cpu"))
    outage = [StoreUnavailable("adapter store s3://b: could not download"), AdapterNotFound("version gone")]
    calls = []

    def load(stored: StoredAdapter) -> AdapterWeights:
        calls.append(stored.name)
        if outage:
            raise outage.pop(0)
        return weights(1.0)

    cache = AdapterCache(spec, pool, 1 << 20, 4, loader=load)
    cache.acquire(adapter("a"))
    got = settle(cache, "a")
    assert got.state is Residency.FAILED and "could not download" in got.error
    assert settle(cache, "a").state is Residency.FAILED and calls == ["a", "a"]  # retried: failed again
    assert settle(cache, "a").state is Residency.READY and calls == ["a", "a", "a"]


def test_pinned_adapters_survive_churn_and_one_slot_stays_unpinned():
    cache = make(slots=3)
    cache.release(ready(cache, "p"))  # loaded, idle on a slot
    got = cache.pin(adapter("p"))
    assert got.state is Residency.READY and cache.pinned("p") and cache.slots_in_use == 1
    for name in ["x1", "x22", "x333", "x4444"]:
        cache.release(ready(cache, name))
    assert cache.tier(adapter("p")) == "device"
    cache.release(ready(cache, "q"))
    cache.pin(adapter("q"))
    with pytest.raises(PinLimitReached, match="2 of 3 slots are pinned"):
        cache.pin(adapter("x1"))
    assert cache.unpin("q") and not cache.pinned("q")
    cache.release(ready(cache, "x1"))
    cache.release(ready(cache, "x22"))  # q was unpinned: its slot is reused, p's never is
    assert cache.tier(adapter("p")) == "device" and cache.tier(adapter("q")) == "host"


def test_evict_refuses_while_running_then_clears_every_tier():
    cache = make(slots=2)
    slot = ready(cache, "a")
    cache.pin(adapter("a"))
    assert cache.evict("a") == 1  # one running request: nothing changes
    assert cache.tier(adapter("a")) == "device" and cache.pinned("a")
    cache.release(slot)
    assert cache.evict("a") == 0
    assert cache.tier(adapter("a")) == "disk" and not cache.pinned("a") and cache.host_bytes == 0
    m = cache.slots.modules[MODULE]
    assert m.host_rank[slot] == 0 and torch.all(m.a[slot] == 0) and cache.slots_in_use == 0
    assert cache.residence() == {}


def test_prefetch_leaves_the_adapter_idle_on_a_slot():
    cache = make(slots=2)
    deadline = time.monotonic() + 10
    while cache.prefetch(adapter("a")).state is not Residency.READY:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert cache.tier(adapter("a")) == "device" and cache.slots_in_use == 0
    where = cache.residence()[("a", "v1")]
    assert where.state == "device" and where.running == 0 and where.stats.loads == 1 and where.stats.activations == 1


def test_a_waiter_gets_the_slot_closest_to_free():
    cache = make(slots=2)
    sa = ready(cache, "a")
    cache.acquire(adapter("a"))  # a: two running requests
    sb = ready(cache, "bb")  # bb: one
    cache.acquire(adapter("ccc"))  # start loading ccc
    deadline = time.monotonic() + 10
    while (got := cache.acquire(adapter("ccc"))).state is Residency.LOADING:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert got.state is Residency.NO_SLOT
    # bb's slot drains: new requests for bb wait, a still admits.
    assert cache.acquire(adapter("bb")).state is Residency.NO_SLOT
    assert cache.acquire(adapter("a")).slot == sa
    cache.release(sb)
    assert cache.acquire(adapter("ccc")).slot == sb


def test_fetch_reads_into_host_memory_without_taking_a_slot_and_only_once():
    calls: list[str] = []
    cache = make(slots=1)
    load = cache._load
    cache._load = lambda stored: calls.append(stored.name) or load(stored)
    slot = ready(cache, "held")  # the only slot is held by a running request
    cache.fetch(adapter("queued"))
    cache.fetch(adapter("queued"))  # already loading: no second read
    deadline = time.monotonic() + 10
    while cache.tier(adapter("queued")) != "host":
        assert time.monotonic() < deadline
        time.sleep(0.005)
        cache.collect()
    cache.fetch(adapter("queued"))  # in host memory: nothing to do
    assert calls == ["held", "queued"]
    assert cache.slots_in_use == 1 and cache.tier(adapter("held")) == "device"
    cache.release(slot)
    assert cache.acquire(adapter("queued")).state is Residency.READY  # straight from host memory
    assert calls == ["held", "queued"]
