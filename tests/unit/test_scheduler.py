"""The scheduler on a residency with a loader the test controls: budgets, KV room, slots, loading adapters."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters_store.backend import StoredAdapter
from server.adapters.residency import Residency
from server.adapters.selection import Selection, Term
from server.engine.block_manager import BlockManager
from server.engine.request import ErrorKind, FinishReason, Request, RequestStatus, SamplingParams
from server.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from tests.helpers.residency import ManualLoader, residency


def adapter(name: str) -> StoredAdapter:
    return StoredAdapter(name=name, path=Path("/nonexistent") / name, version="v" + name)


def req(i: int, prompt: int = 4, max_tokens: int = 4, name: str | None = None) -> Request:
    return Request(f"r{i}", list(range(1, prompt + 1)), SamplingParams(max_tokens=max_tokens),
                   selection=Selection.of(adapter(name) if name else None))


def composed(i: int, *terms: tuple[str, float], prompt: int = 4, max_tokens: int = 4) -> Request:
    selection = Selection(tuple(Term(adapter(name), weight) for name, weight in terms))
    return Request(f"r{i}", list(range(1, prompt + 1)), SamplingParams(max_tokens=max_tokens), selection=selection)


def make(slots=2, blocks=64, block_size=4, clock=None, adapters=None, **kw) -> Scheduler:
    extra = {"clock": clock} if clock else {}
    return Scheduler(SchedulerConfig(**kw), BlockManager(blocks, block_size), adapters or residency(slots), **extra)


def loader(s: Scheduler) -> ManualLoader:
    return s.residency.loader


def slot_of(s: Scheduler, name: str) -> int:
    return s.residency.snapshot({}).records[adapter(name).key].slot


def held(s: Scheduler) -> dict[int, int]:
    """Running requests per slot (pins are not requests)."""
    return dict(s.busy_slots())


def pin(s: Scheduler, name: str) -> None:
    s.residency.load(adapter(name), True, s.busy_slots()).result(0)


def ids(requests) -> list[str]:
    return [r.request_id for r in requests]


def stepped(batch) -> list[str]:
    return sorted(r.request_id for r, _ in batch.steps)


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
    # KV on demand: a request takes the blocks of its first chunk only (8 prompt tokens: 2 blocks of 4), and
    # newer ones are admitted while a block stays free (the watermark) for the running ones to grow into.
    s = make(blocks=7, max_num_seqs=10)
    for i in range(4):
        s.add(req(i, prompt=8, max_tokens=16))
    assert stepped(s.schedule()) == ["r0", "r1", "r2"]
    assert s.blocks.free_blocks == 1 and ids(s.waiting) == ["r3"]


def step(s: Scheduler, token: int = 7) -> ScheduledBatch:
    """One engine step without a model: schedule, compute, sample ``token`` where a sample is due."""
    batch = s.schedule()
    due = [r for r, n in batch.steps if r.num_computed + n >= r.num_tokens]
    s.computed(batch.steps)
    for r in due:
        r.output_ids.append(token)
        if len(r.output_ids) >= r.params.max_tokens:
            s.finish(r, FinishReason.LENGTH)
    return batch


def test_blocks_are_taken_as_sequences_grow_and_the_newest_is_preempted_when_none_is_free():
    s = make(blocks=4, max_num_seqs=10)  # 16 tokens of KV
    a, b = req(0, prompt=4, max_tokens=9), req(1, prompt=4, max_tokens=9)
    s.add(a)
    s.add(b)
    assert stepped(step(s)) == ["r0", "r1"] and (len(a.blocks), len(b.blocks)) == (1, 1)
    step(s)  # each decodes at position 4: a second block each
    assert (len(a.blocks), len(b.blocks)) == (2, 2) and s.blocks.free_blocks == 0
    for _ in range(3):
        step(s)
    assert a.num_computed == b.num_computed == 8
    batch = step(s)  # both need a third block and none is free: b, admitted last, gives its blocks up
    assert ids(batch.preempted) == ["r1"] and stepped(batch) == ["r0"]
    assert b.status is RequestStatus.WAITING and b.blocks == [] and b.num_computed == 0 and ids(s.waiting) == ["r1"]
    assert b.preemptions == 1 and len(b.output_ids) == 5  # what it generated is kept
    while a.status is not RequestStatus.FINISHED:
        step(s)
    # b comes back, computes its prompt and outputs again (its blocks were reused by a meanwhile), then goes on
    while b.status is not RequestStatus.FINISHED:
        step(s)
    assert len(b.output_ids) == 9 and s.blocks.used_blocks == 0 and not s.has_work


def test_a_preempted_request_goes_back_to_the_front_and_newer_ones_wait_behind_it():
    s = make(blocks=4, max_num_seqs=10)
    a, b = req(0, prompt=4, max_tokens=12), req(1, prompt=4, max_tokens=12)
    s.add(a)
    s.add(b)
    while not b.preemptions:
        step(s)
    s.add(req(2, prompt=4, max_tokens=2))  # would fit in a block, but b is first in line
    step(s)
    assert ids(s.waiting) == ["r1", "r2"]


def test_a_request_alone_always_fits_however_it_grows():
    s = make(blocks=4, max_num_seqs=10)
    s.add(req(0, prompt=5, max_tokens=11))  # exactly the whole cache
    for _ in range(12):
        assert not step(s).preempted
    assert not s.has_work and s.blocks.used_blocks == 0


def test_a_shared_prefix_is_computed_once_and_the_last_token_always_again():
    s = make(blocks=16)
    first = req(0, prompt=10, max_tokens=1)
    s.add(first)
    step(s)
    assert not s.has_work and s.blocks.cached_blocks == 2  # positions 0..7 in two full blocks; 8..9 not full
    again = req(1, prompt=10, max_tokens=1)
    s.add(again)
    (r, n), = s.schedule().steps
    assert r is again and r.num_computed == 8 and n == 2 and again.cached_tokens == 8
    s.finish(again, FinishReason.ABORT)
    longer = req(2, prompt=12, max_tokens=1)  # 12 tokens: blocks 0..1 cached; block 2 (8..11) holds the last
    s.add(longer)
    (r, n), = s.schedule().steps
    assert r.num_computed == 8 and n == 4
    s.finish(longer, FinishReason.ABORT)
    exact = req(3, prompt=8, max_tokens=1)  # the whole prompt is cached: its last block is computed again
    s.add(exact)
    (r, n), = s.schedule().steps
    assert r.num_computed == 4 and n == 4 and r.cached_tokens == 4


def test_cached_blocks_are_shared_read_only_and_kept_after_their_requests_end():
    s = make(blocks=16)
    a, b = req(0, prompt=9, max_tokens=3), req(1, prompt=9, max_tokens=3)
    s.add(a)
    step(s)
    s.add(b)
    step(s)
    assert b.blocks[:2] == a.blocks[:2] and b.blocks[2] != a.blocks[2]
    assert [s.blocks.refs(x) for x in a.blocks[:2]] == [2, 2]
    while s.has_work:
        step(s)
    assert s.blocks.used_blocks == 0 and s.blocks.cached_blocks >= 2


@pytest.mark.parametrize("other", [
    lambda: req(1, prompt=9, max_tokens=1, name="b"),  # another adapter
    lambda: Request("r1", list(range(1, 10)), SamplingParams(max_tokens=1),
                    selection=Selection.of(StoredAdapter("a", "v-reuploaded", Path("/nonexistent/a")))),
    lambda: req(1, prompt=9, max_tokens=1),  # the base model
    lambda: composed(1, ("a", 1.0), ("b", 0.5), prompt=9, max_tokens=1),
    lambda: composed(1, ("a", 0.5), prompt=9, max_tokens=1),  # the same adapter at another weight
], ids=["other-adapter", "same-name-new-version", "base", "composition", "other-weight"])
def test_blocks_computed_by_one_adapter_version_are_never_found_by_other_weights(other):
    s = make(slots=4, blocks=16)
    s.add(req(0, prompt=9, max_tokens=1, name="a"))
    step(s)
    assert s.blocks.cached_blocks == 2
    r = other()
    s.add(r)
    s.schedule()
    assert r.num_computed == 0 and r.cached_tokens == 0


def test_the_same_adapter_version_under_another_name_shares_its_blocks():
    s = make(slots=4, blocks=16)
    s.add(req(0, prompt=9, max_tokens=1, name="a"))
    step(s)
    twin = Request("r1", list(range(1, 10)), SamplingParams(max_tokens=1),
                   selection=Selection.of(StoredAdapter("twin", "va", Path("/nonexistent/twin"))))
    s.add(twin)
    s.schedule()
    assert twin.cached_tokens == 8  # the key is the content's digest, not the name


def test_without_prefix_caching_nothing_is_shared():
    s = Scheduler(SchedulerConfig(), BlockManager(16, 4, caching=False), residency(2))
    for i in range(2):
        s.add(req(i, prompt=9, max_tokens=1))
        step(s)
    assert s.blocks.cached_blocks == 0 and all(r == 0 for r in s.blocks._refs)


def test_cached_blocks_are_dropped_least_recently_released_first_when_fresh_ones_are_needed():
    s = make(blocks=6)
    for i, start in enumerate((100, 200)):
        r = Request(f"r{i}", list(range(start, start + 9)), SamplingParams(max_tokens=1))
        s.add(r)
        step(s)
    assert s.blocks.cached_blocks == 4 and s.blocks.free_blocks == 6
    s.add(Request("r2", list(range(300, 309)), SamplingParams(max_tokens=1)))  # 3 fresh blocks: 2 empty, 1 cached
    step(s)
    again = Request("r3", list(range(200, 209)), SamplingParams(max_tokens=1))
    s.add(again)
    s.schedule()
    assert again.cached_tokens == 8  # r1's prefix, released last, survived


def test_finish_releases_blocks_and_adapter_reference():
    s = make()
    s.add(req(0, name="a"))
    (r, _), = s.schedule().steps
    assert r.slots == (0,) and held(s) == {0: 1}
    assert s.residency.snapshot({}).records[adapter("a").key].refs == 1  # held from add to finish
    s.finish(r, FinishReason.STOP)
    assert held(s) == {} and s.blocks.free_blocks == 64 and r.slots == ()
    assert s.residency.snapshot({}).records[adapter("a").key].refs == 0
    assert r.status is RequestStatus.FINISHED and not s.running


def test_waiting_for_a_loading_adapter_does_not_block_others():
    s = make()
    loader(s).blocked.add("cold")
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
    loader(s).broken.add("bad")
    s.add(req(0, name="bad"))
    s.add(req(1))
    batch = s.schedule()
    assert [r.request_id for r in batch.failed] == ["r0"]
    assert batch.failed[0].finish_reason is FinishReason.ERROR
    assert [r.request_id for r, _ in batch.steps] == ["r1"]


def test_a_load_that_failed_for_a_passing_reason_is_unavailable_not_invalid():
    s = make()
    loader(s).broken.add("bad")
    loader(s).store_down.add("later")
    s.add(req(0, name="bad"))
    s.add(req(1, name="later"))
    failed = {r.request_id: r.error_kind for r in s.schedule().failed}
    assert failed == {"r0": ErrorKind.ADAPTER, "r1": ErrorKind.UNAVAILABLE}  # 400 vs 503 with Retry-After


def test_batch_is_grouped_by_adapter_slot():
    s = make(slots=3)
    for i, name in enumerate(["a", "b", None, "a", "b", None]):
        s.add(req(i, name=name))
    slots = [r.sort_slot for r, _ in s.schedule().steps]
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
        loader(s).blocked.add("b")
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


# --------------------------------------------------------------------------- compositions and slot order


PAIR = (("a", 0.5), ("b", -1.0))


def test_a_composition_takes_all_its_slots_or_none():
    s = make(slots=2)
    loader(s).blocked.add("b")
    s.add(composed(0, *PAIR))
    s.add(req(1))
    assert stepped(s.schedule()) == ["r1"]  # "a" had a slot; "b" still loads: "a"'s is not taken
    assert ids(s.waiting) == ["r0"] and held(s) == {}
    loader(s).blocked.discard("b")
    (r, _), = [step for step in s.schedule().steps if step[0].request_id == "r0"]
    assert r.status is RequestStatus.RUNNING and r.sort_slot == -1
    assert sorted(r.slots) == [0, 1] and held(s) == {0: 1, 1: 1}
    assert r.slots == (slot_of(s, "a"), slot_of(s, "b"))  # in the composition's order
    assert r.lora_terms == ((slot_of(s, "a"), 0.5), (slot_of(s, "b"), -1.0))
    s.finish(r, FinishReason.STOP)
    assert held(s) == {} and r.slots == ()


def test_a_composition_missing_one_slot_holds_none_meanwhile():
    s = make(slots=2)
    s.add(req(0, name="m", max_tokens=50))
    s.schedule()  # r0 holds one of the two slots
    s.add(composed(1, *PAIR))
    assert stepped(s.schedule()) == ["r0"]
    assert ids(s.waiting) == ["r1"] and held(s) == {s.running[0].slots[0]: 1}
    s.finish(s.running[0], FinishReason.STOP)
    batch = s.schedule()
    assert stepped(batch) == ["r1"] and len(set(batch.steps[0][0].slots)) == 2


def test_a_composition_larger_than_the_unpinned_slots_fails_at_once():
    s = make(slots=2)
    pin(s, "p")  # one of the two slots, for good
    s.add(composed(0, *PAIR))
    s.add(composed(1, ("a", 1.0), ("p", 0.5)))  # the pinned adapter's own slot counts for it
    s.add(req(2))
    batch = s.schedule()
    [failed] = batch.failed
    assert failed.request_id == "r0" and failed.error_kind is ErrorKind.UNAVAILABLE
    assert failed.finish_reason is FinishReason.ERROR and "pinned" in failed.error and "only 1" in failed.error
    assert stepped(batch) == ["r1", "r2"] and not s.waiting  # not left waiting for the adapter wait bound
    assert held(s) == {slot_of(s, "a"): 1, slot_of(s, "p"): 1}  # r1's two
    assert s.residency.snapshot(s.busy_slots()).slots_in_use == 2


def test_once_an_older_request_waits_for_a_slot_newer_ones_get_no_new_slot():
    """Slots in arrival order: a newer request may not take a slot a waiter needs, nor join the one draining
    for it."""
    s = make(slots=2)
    s.add(req(0, name="m", max_tokens=50))
    s.schedule()  # r0 holds "m"'s slot
    s.add(composed(1, *PAIR))  # needs both slots: waits (no_slot); m's slot drains for it
    s.add(req(2, name="c"))  # not resident: the free slot is the composition's
    s.add(req(3, name="m"))  # on the draining slot: waits too
    s.add(req(4))  # base model only
    batch = s.schedule()
    assert stepped(batch) == ["r0", "r4"], "a newer request took a slot the older composition waits for"
    assert ids(s.waiting) == ["r1", "r2", "r3"]
    s.finish(next(r for r in s.running if r.request_id == "r0"), FinishReason.STOP)
    assert stepped(s.schedule()) == ["r1", "r4"] and ids(s.waiting) == ["r2", "r3"]  # the composition first
    s.finish(next(r for r in s.running if r.request_id == "r1"), FinishReason.STOP)
    assert stepped(s.schedule()) == ["r2", "r3", "r4"] and not s.waiting


def test_a_request_waiting_for_a_load_reserves_no_slot():
    """Only a wait for a free slot holds newer requests back; a load from disk does not."""
    s = make(slots=2)
    loader(s).blocked.add("cold")
    s.add(req(0, name="cold"))
    s.add(req(1, name="c"))
    assert stepped(s.schedule()) == ["r1"] and ids(s.waiting) == ["r0"]


class RaisingResidency(Residency):
    """Raises in ``acquire`` for the adapters named in ``boom``."""

    def __init__(self, slots: int, boom: set[str]):
        made = residency(slots)
        super().__init__(made.slots, made.host_bytes_limit, made.loader)
        self.loader.blocked.add("cold")
        self.boom = boom

    def acquire(self, adapter, busy, holding=(), new_slot=True):
        if adapter.name in self.boom:
            raise RuntimeError("simulated fault in the residency")
        return super().acquire(adapter, busy, holding, new_slot)


def _raising_pass(boom_request: Request) -> tuple[Scheduler, ScheduledBatch | None]:
    """r0 (base) is admitted, r1 waits for a load, ``boom_request`` (r2) raises, r3 and r4 are not looked at yet."""
    s = make(adapters=RaisingResidency(slots=2, boom={"boom"}))
    for r in (req(0), req(1, name="cold"), boom_request, req(3, name="c"), req(4)):
        s.add(r)
    try:
        return s, s.schedule()
    except RuntimeError:
        return s, None


def test_an_error_in_acquire_fails_that_request_and_the_pass_goes_on():
    s, batch = _raising_pass(req(2, name="boom"))
    assert batch is not None, "the cache's exception escaped the scheduler"
    assert ids(batch.failed) == ["r2"] and batch.failed[0].error_kind is ErrorKind.INTERNAL
    assert ids(s.running) == ["r0", "r3", "r4"]  # the requests behind it still run
    assert ids(s.waiting) == ["r1"]  # and the one waiting for its load still waits
    loader(s).blocked.clear()
    assert "r1" in stepped(s.schedule())


def test_the_request_whose_acquire_raised_is_not_lost():
    """It stays waiting, or is finished with an error: never dropped (its client would wait for ever)."""
    s, batch = _raising_pass(req(2, name="boom"))
    kept = "r2" in ids(s.waiting)
    failed = batch is not None and "r2" in ids(batch.failed)
    assert kept or failed, f"r2 is neither waiting nor failed: waiting {ids(s.waiting)}, running {ids(s.running)}"


def test_an_error_in_acquire_for_a_composition_leaks_no_slot():
    s, _ = _raising_pass(composed(2, ("a", 1.0), ("boom", 0.5)))  # "a" gets a slot, then "boom" raises
    assert held(s) == {slot_of(s, "c"): 1}, f"slots left busy by the composition that raised: {held(s)}"
    refs = {k[0]: r.refs for k, r in s.residency.snapshot({}).records.items()}
    assert refs == {"cold": 1, "a": 0, "boom": 0, "c": 1}, refs  # the failed request's holds were released


def test_adapters_of_requests_queued_behind_a_full_batch_are_read_ahead_at_most_a_batch_of_them():
    s = make(slots=4, max_num_seqs=2)
    for i, name in enumerate(["a", "b", "c", None, "d", "e"]):
        s.add(req(i, name=name))
    assert stepped(s.schedule()) == ["r0", "r1"]
    # r2..r5 wait: the adapters of the first two adapter requests among them (max_num_seqs) start loading
    assert loader(s).started == ["a", "b", "c", "d"]
    assert s.residency.tier(adapter("c")) == "host" and s.residency.tier(adapter("e")) == "disk"
    assert ids(s.waiting) == ["r2", "r3", "r4", "r5"]


def test_requests_waiting_for_kv_room_have_their_adapters_read_ahead():
    s = make(slots=4, blocks=3, block_size=4)  # room for one prompt of 8 tokens, and a block to grow into
    s.add(req(0, prompt=8))
    s.add(req(1, prompt=8, name="a"))
    assert stepped(s.schedule()) == ["r0"]
    assert loader(s).started == ["a"] and ids(s.waiting) == ["r1"]
