"""The scheduler with a fake adapter cache: budgets, KV room, slots, loading adapters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from adapters_store.backend import StoredAdapter
from server.engine.block_manager import BlockManager
from server.engine.request import ErrorKind, FinishReason, Request, RequestStatus, SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig


@dataclass
class Got:
    state: str
    slot: int = -1
    error: str | None = None


class FakeAdapters:
    def __init__(self, slots: int, loading: set[str] = frozenset(), broken: set[str] = frozenset()):
        self.free = list(range(slots))
        self.slot_of: dict[str, int] = {}
        self.refs: dict[int, int] = {}
        self.loading, self.broken = set(loading), set(broken)

    def tier(self, adapter):
        return "device" if adapter.name in self.slot_of else "disk"

    def capacity(self, adapters):
        return len(self.free)

    def acquire(self, adapter, holding=(), new_slot=True):
        if adapter.name in self.broken:
            return Got("failed", error="broken adapter")
        if adapter.name in self.loading:
            return Got("loading")
        slot = self.slot_of.get(adapter.name)
        if slot is None:
            idle = [s for s in self.free if self.refs.get(s, 0) == 0]
            if not idle or not new_slot:
                return Got("no_slot")
            slot = idle[0]
            self.slot_of = {k: v for k, v in self.slot_of.items() if v != slot}
            self.slot_of[adapter.name] = slot
        self.refs[slot] = self.refs.get(slot, 0) + 1
        return Got("ready", slot)

    def release(self, slot):
        if slot >= 0:
            self.refs[slot] -= 1
            assert self.refs[slot] >= 0


def adapter(name: str) -> StoredAdapter:
    return StoredAdapter(name=name, path=Path("/nonexistent") / name, version="v" + name)


def req(i: int, prompt: int = 4, max_tokens: int = 4, name: str | None = None) -> Request:
    return Request(f"r{i}", list(range(1, prompt + 1)), SamplingParams(max_tokens=max_tokens),
                   adapter=adapter(name) if name else None)


def make(slots=2, blocks=64, block_size=4, clock=None, **kw) -> Scheduler:
    extra = {"clock": clock} if clock else {}
    return Scheduler(SchedulerConfig(**kw), BlockManager(blocks, block_size), FakeAdapters(slots), **extra)


def test_prefill_is_chunked_under_the_token_budget_and_decodes_go_first():
    s = make(max_num_batched_tokens=6)
    s.add(req(0, prompt=10))
    b1 = s.schedule()
    assert [(r.request_id, n) for r, n in b1.steps] == [("r0", 6)]
    b1.steps[0][0].num_computed += 6
    s.add(req(1, prompt=3))
    b2 = s.schedule()
    assert [(r.request_id, n) for r, n in b2.steps] == [("r0", 4), ("r1", 2)]


def test_sequence_limit_and_kv_room_bound_admission():
    s = make(max_num_seqs=2)
    for i in range(3):
        s.add(req(i))
    assert len(s.schedule().steps) == 2
    assert [r.request_id for r in s.waiting] == ["r2"]
    # KV: 8 blocks of 4 tokens; each request needs 2 blocks (4 + 4 tokens).
    s = make(blocks=5, max_num_seqs=10)
    for i in range(4):
        s.add(req(i))
    assert len(s.schedule().steps) == 2
    assert s.blocks.free_blocks == 1


def test_finish_releases_blocks_and_adapter_reference():
    s = make()
    s.add(req(0, name="a"))
    (r, _), = s.schedule().steps
    assert r.slot == 0 and s.adapters.refs[0] == 1
    s.finish(r, FinishReason.STOP)
    assert s.adapters.refs[0] == 0 and s.blocks.free_blocks == 64
    assert r.status is RequestStatus.FINISHED and not s.running


def test_waiting_for_a_loading_adapter_does_not_block_others():
    s = make()
    s.adapters.loading.add("cold")
    s.add(req(0, name="cold"))
    s.add(req(1, name="hot"))
    s.add(req(2))
    ids = [r.request_id for r, _ in s.schedule().steps]
    assert sorted(ids) == ["r1", "r2"]
    assert [r.request_id for r in s.waiting] == ["r0"]


def test_all_slots_held_means_wait_not_evict():
    s = make(slots=1)
    s.add(req(0, name="a"))
    s.schedule()
    s.add(req(1, name="b"))
    assert s.schedule().steps[0][0].request_id == "r0"  # r1 waits: the one slot is held
    assert [r.request_id for r in s.waiting] == ["r1"]
    s.finish(s.running[0], FinishReason.STOP)
    assert [r.request_id for r, _ in s.schedule().steps] == ["r1"]


def test_failed_adapter_fails_only_its_request():
    s = make()
    s.adapters.broken.add("bad")
    s.add(req(0, name="bad"))
    s.add(req(1))
    batch = s.schedule()
    assert [r.request_id for r in batch.failed] == ["r0"]
    assert batch.failed[0].finish_reason is FinishReason.ERROR
    assert [r.request_id for r, _ in batch.steps] == ["r1"]


def test_batch_is_grouped_by_adapter_slot():
    s = make(slots=3)
    for i, name in enumerate(["a", "b", None, "a", "b", None]):
        s.add(req(i, name=name))
    slots = [r.slot for r, _ in s.schedule().steps]
    assert slots == sorted(slots)


def test_requests_beyond_the_context_or_the_cache_are_refused():
    s = make(max_model_len=10)
    with pytest.raises(ValueError, match="context limit of 10"):
        s.add(req(0, prompt=8, max_tokens=4))
    s = make(blocks=2, max_model_len=100)
    with pytest.raises(ValueError, match="more KV cache"):
        s.add(req(0, prompt=8, max_tokens=4))


@pytest.mark.parametrize("why", ["no free device slot", "did not finish loading"])
def test_waiting_for_an_adapter_is_bounded(why):
    now = [0.0]
    s = make(slots=1, clock=lambda: now[0], adapter_wait_timeout=5.0)
    s.add(req(0, name="a", max_tokens=50))
    s.schedule()  # r0 holds the only slot for a long time
    if why == "did not finish loading":
        s.adapters.loading.add("b")
    s.add(req(1, name="b"))
    s.add(req(2))
    assert sorted(r.request_id for r, _ in s.schedule().steps) == ["r0", "r2"]
    now[0] = 4.9
    assert not s.schedule().failed and [r.request_id for r in s.waiting] == ["r1"]
    now[0] = 5.1
    batch = s.schedule()
    [failed] = batch.failed
    assert failed.request_id == "r1" and failed.error_kind is ErrorKind.UNAVAILABLE
    assert why in failed.error and "5 s" in failed.error
    assert not s.waiting and [r.request_id for r in s.running] == ["r0", "r2"]
