"""Which requests run in the next step. Pure Python: no torch, testable with fakes."""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from server.adapters.residency import Acquired, Outcome, Residency
from server.engine.block_manager import BlockManager, extend_keys
from server.engine.request import ErrorKind, FinishReason, Request, RequestStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences in one step
    max_num_batched_tokens: int = 512  # tokens in one step (prefill chunks + decodes)
    max_model_len: int = 0  # prompt + output tokens of one request; 0 = the model's context, capped by the KV cache
    adapter_wait_timeout: float = 30.0  # seconds a request may wait for its adapter's load or a free slot

    def __post_init__(self) -> None:
        if min(self.max_num_seqs, self.max_num_batched_tokens) < 1 or self.max_model_len < 0:
            raise ValueError("scheduler limits must be positive")
        if not self.adapter_wait_timeout > 0:
            raise ValueError("adapter_wait_timeout must be positive")


@dataclass
class ScheduledBatch:
    steps: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens this step)
    failed: list[Request] = field(default_factory=list)  # finished with an error while scheduling
    preempted: list[Request] = field(default_factory=list)  # sent back to the queue to free KV blocks

    @property
    def empty(self) -> bool:
        return not self.steps


class Scheduler:
    """FIFO admission under a token budget, a sequence limit, KV room and free adapter slots.

    KV blocks are taken as a sequence grows, a step's worth at a time. When a
    running request finds none free, the most recently admitted request is
    preempted: its blocks are released, it goes back to the front of the queue
    and computes its tokens again when readmitted (its client only sees the
    delay). With prefix caching, an admitted request starts from the longest
    run of cached blocks with its tokens and its ``kv_salt``. A request whose
    adapter is still loading, or finds every slot busy, waits without blocking
    the requests behind it. A request holds its adapters' versions from
    :meth:`add` to :meth:`finish`, the one place that frees what a request held.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        blocks: BlockManager,
        residency: Residency,
        clock: Callable[[], float] = time.monotonic,
        recompute_at: int | None = None,
    ) -> None:
        """``recompute_at``: a sequence whose cached tokens were computed while it was at most this long is
        computed again when it grows past it (longrope: transformers' Phi-3 switches to the long rope table
        there and recomputes the cache once)."""
        self.config = config
        self.recompute_at = recompute_at
        self.clock = clock
        self.blocks = blocks
        self.residency = residency
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        # blocks kept free when admitting while others run, so a running request's next block rarely preempts
        self.watermark = max(1, blocks.num_blocks // 100)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        if self.config.max_model_len and request.max_total_tokens > self.config.max_model_len:
            raise ValueError(
                f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.params.max_tokens}) "
                f"exceeds the context limit of {self.config.max_model_len} tokens"
            )
        if self.blocks.blocks_for(request.max_total_tokens) > self.blocks.num_blocks:
            raise ValueError(f"the request needs more KV cache than the server has ({self.blocks.num_blocks} blocks)")
        request.tiers = tuple(self.residency.hold(a).tier for a in request.adapters)
        self.waiting.append(request)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        at = self.recompute_at
        if at is not None:  # past the short rope table: its K/V are computed again, from the queue's front
            for req in [r for r in self.running if r.num_computed == at and r.num_tokens == at + 1]:
                if len(req.prompt_ids) <= at:
                    self._requeue(req, batch)
        budget = self.config.max_num_batched_tokens
        decoding = [r for r in self.running if not r.in_prefill]
        for req in decoding + [r for r in self.running if r.in_prefill]:  # decodes first, then prompt chunks
            if budget <= 0 or req.status is not RequestStatus.RUNNING:
                continue
            n = len(req.next_tokens(budget))
            preempted = len(batch.preempted)
            if self._grow(req, req.num_computed + n, batch):
                batch.steps.append((req, n))
                budget -= n
            if len(batch.preempted) != preempted:  # a preempted request's step may have left the batch
                budget = self.config.max_num_batched_tokens - sum(k for _, k in batch.steps)
        self._admit(batch, budget)
        batch.steps.sort(key=lambda step: step[0].sort_slot)  # runs of equal adapter for the LoRA op
        return batch

    def computed(self, steps: list[tuple[Request, int]]) -> None:
        """After the forward pass: each step's tokens have their K/V; full blocks join the prefix cache."""
        size = self.blocks.block_size
        for req, n in steps:
            first = req.num_computed // size  # the blocks before it were full already (registered, or cache hits)
            req.num_computed += n
            full = req.num_computed // size
            if full > first and self.blocks.caching:
                extend_keys(req.block_keys, req.tokens, size, req.kv_salt, full * size)
                for i in range(first, full):
                    self.blocks.register(req.blocks[i], req.block_keys[i])

    def _grow(self, req: Request, tokens: int, batch: ScheduledBatch) -> bool:
        """Blocks for ``req``'s first ``tokens`` positions, preempting the most recently admitted requests until
        they fit; False when ``req`` itself was the one preempted."""
        need = self.blocks.blocks_for(tokens) - len(req.blocks)
        while need > 0:
            fresh = self.blocks.allocate(need)
            if fresh is not None:
                req.blocks.extend(fresh)
                return True
            victim = self.running[-1]
            self._requeue(victim, batch, preempted=True)
            if victim is req:
                return False
        return True

    def _requeue(self, req: Request, batch: ScheduledBatch, preempted: bool = False) -> None:
        """Back to the front of the queue, its blocks (and slots) released: readmitted, it computes its tokens
        again, from the prefix cache where it can."""
        self.running.remove(req)
        self.blocks.release(req.blocks)
        req.blocks, req.num_computed, req.slots = [], 0, ()
        req.adapter_wait_since = None  # a wait for its adapters starts afresh
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        if any(r is req for r, _ in batch.steps):
            batch.steps = [(r, n) for r, n in batch.steps if r is not req]
        if preempted:
            req.preemptions += 1
            batch.preempted.append(req)
            log.debug("preempted request %s to free KV blocks", req.request_id)

    def busy_slots(self) -> Counter[int]:
        """Running requests per adapter slot: those slots are never given to another adapter."""
        return Counter(slot for req in self.running for slot in req.slots)

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        still_waiting: deque[Request] = deque()
        # Once an older request waits for a free slot, newer ones may only use adapters already on a slot:
        # slots are handed out in arrival order, so a composition needing several is not starved.
        slots_reserved = False
        # Once an older request waits for KV blocks, newer ones wait too: a preempted request is not starved.
        kv_full = False
        # Queued requests that cannot start this step have their adapters read into host memory meanwhile
        # (at most a batch's worth of them), so a load never waits for a free sequence slot to begin.
        look_ahead = self.config.max_num_seqs
        busy = self.busy_slots()
        try:
            while self.waiting:
                req = self.waiting.popleft()
                if self._behind_sibling(req):
                    still_waiting.append(req)
                    continue
                if any(r is req for r in batch.preempted):  # it waits a step, and every newer request with it
                    kv_full = True
                full = kv_full or budget <= 0 or len(self.running) >= self.config.max_num_seqs
                cached: list[int] = []
                if not full:  # room for its first chunk past the cached prefix
                    cached = self._cached_prefix(req)
                    start = len(cached) * self.blocks.block_size
                    need = self.blocks.blocks_for(min(req.num_tokens, start + budget)) - len(cached)
                    keep = self.watermark if self.running else 0
                    kv_full = full = self.blocks.free_blocks - self.blocks.idle_among(cached) - need < keep
                if full:
                    still_waiting.append(req)
                    if req.adapters and look_ahead > 0:
                        look_ahead -= 1
                        for a in req.adapters:
                            self.residency.read_ahead(a)
                    continue
                if req.adapters:
                    waiting_for = self._acquire_adapters(req, batch, busy, new_slots=not slots_reserved)
                    if waiting_for is not None:
                        if req.status is RequestStatus.WAITING:
                            still_waiting.append(req)
                            slots_reserved = slots_reserved or waiting_for is Outcome.NO_SLOT
                        continue
                    busy.update(req.slots)
                self.blocks.take(cached)
                req.blocks = cached
                req.num_computed = len(cached) * self.blocks.block_size
                n = len(req.next_tokens(budget))
                fresh = self.blocks.allocate(need)
                if fresh is None:
                    raise RuntimeError("KV blocks counted free at admission are gone")
                req.blocks += fresh
                if req.cached_tokens is None:
                    req.cached_tokens = min(req.num_computed, len(req.prompt_ids))
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                batch.steps.append((req, n))
                budget -= n
        finally:  # whatever happens, no waiting request is lost
            still_waiting.extend(self.waiting)
            self.waiting = still_waiting

    def _behind_sibling(self, req: Request) -> bool:
        """A request of ``n`` > 1 waits until the sibling it follows has computed their prompt, then starts from
        its cached blocks (with the prefix cache on; otherwise nothing would be shared and it does not wait)."""
        lead = req.follows
        if lead is None or not self.blocks.caching or lead.status is RequestStatus.FINISHED:
            return False
        return lead.status is RequestStatus.WAITING or lead.num_computed < len(lead.prompt_ids)

    def _cached_prefix(self, req: Request) -> list[int]:
        """The cached blocks ``req`` may start from: the longest registered run of its full blocks, short of its
        last token (whose logits the next sample needs), under its current ``kv_salt``."""
        salt = self.salt(req)
        if salt != req.kv_salt:
            req.kv_salt, req.block_keys = salt, []
        if not self.blocks.caching or req.wants_prompt_logprobs:  # those need every prompt token's logits
            return []
        upto = req.num_tokens - 1
        extend_keys(req.block_keys, req.tokens, self.blocks.block_size, salt, upto)
        return self.blocks.match(req.block_keys[: upto // self.blocks.block_size])

    def salt(self, req: Request) -> bytes:
        """``req``'s K/V salt: its selection's, and with longrope, the rope table its length picks."""
        salt = req.selection.kv_salt
        if self.recompute_at is not None and req.num_tokens > self.recompute_at:
            salt += b"|long-rope"
        return salt

    def _acquire_adapters(
        self, req: Request, batch: ScheduledBatch, busy: Counter[int], new_slots: bool
    ) -> Outcome | None:
        """Take a slot for each of ``req``'s adapters, or none of them.

        None when it has them all; else why not (``LOADING``, ``NO_SLOT``, or
        ``FAILED``, the request then finished with its error).
        """
        slots: list[int] = []
        for adapter in req.adapters:
            try:
                got = self.residency.acquire(adapter, busy, slots, new_slots)
            except Exception:  # the residency's fault: this request fails, the others carry on
                log.exception("acquiring adapter %s failed", adapter.ref)
                self._fail(req, batch, f"adapter {adapter.name!r} could not be made resident", ErrorKind.INTERNAL)
                return Outcome.FAILED
            if got.outcome is Outcome.READY:
                slots.append(got.slot)
                continue
            if got.outcome is Outcome.FAILED:
                kind = ErrorKind.UNAVAILABLE if got.retryable else ErrorKind.ADAPTER
                self._fail(req, batch, f"adapter {adapter.name!r} cannot be loaded: {got.error}", kind)
                return Outcome.FAILED
            capacity = self.residency.capacity(req.adapters)
            if len(req.adapters) > capacity:
                self._fail(
                    req,
                    batch,
                    f"the request composes {len(req.adapters)} adapters but only {capacity} device slots are "
                    "not pinned by other adapters; retry after an unpin",
                    ErrorKind.UNAVAILABLE,
                )
                return Outcome.FAILED
            now = self.clock()
            if req.adapter_wait_since is None:
                req.adapter_wait_since = now
            if now - req.adapter_wait_since > self.config.adapter_wait_timeout:
                self._fail(req, batch, self._wait_message(adapter.name, got), ErrorKind.UNAVAILABLE)
                return Outcome.FAILED
            return got.outcome
        req.slots = tuple(slots)
        return None

    def _fail(self, req: Request, batch: ScheduledBatch, error: str, kind: ErrorKind = ErrorKind.ADAPTER) -> None:
        """``req`` (waiting, being admitted) ends with ``error``."""
        req.error, req.error_kind = error, kind
        self.finish(req, FinishReason.ERROR)
        batch.failed.append(req)

    def _wait_message(self, name: str, got: Acquired) -> str:
        loading = got.outcome is Outcome.LOADING
        why = "did not finish loading" if loading else "found no free device slot (all are busy with running requests)"
        return f"adapter {name!r} {why} within {self.config.adapter_wait_timeout:g} s; retry later"

    def finish(self, req: Request, reason: FinishReason) -> None:
        """Free what ``req`` holds (KV blocks, slots, its hold on its adapters); it leaves the running or
        waiting set. Once per request: a finished request is left as it is."""
        if req.status is RequestStatus.FINISHED:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self.blocks.release(req.blocks)
            req.blocks = []
        elif req in self.waiting:
            self.waiting.remove(req)
        req.slots = ()
        for adapter in req.adapters:
            self.residency.release(adapter)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    def find(self, request_id: str) -> Request | None:
        for req in self.running:
            if req.request_id == request_id:
                return req
        for req in self.waiting:
            if req.request_id == request_id:
                return req
        return None
