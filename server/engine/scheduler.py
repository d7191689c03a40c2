"""Which requests run in the next step. Pure Python: no torch, testable with fakes."""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from server.adapters.residency import Acquired, Outcome, Residency
from server.engine.block_manager import BlockManager
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

    @property
    def empty(self) -> bool:
        return not self.steps


class Scheduler:
    """FIFO admission under a token budget, a sequence limit, KV room and free adapter slots.

    KV blocks for a request's whole budget (prompt + max_tokens) are taken at
    admission, so a running request never runs out of cache and nothing is
    preempted. A request whose adapter is still loading, or finds every slot
    busy, waits without blocking the requests behind it. A request holds its
    adapters' versions from :meth:`add` to :meth:`finish`, the one place that
    frees what a request held.
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
        self.running: list[Request] = []

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
        budget = self.config.max_num_batched_tokens
        at = self.recompute_at
        if at is not None:
            for req in self.running:
                if req.num_computed == at and req.num_tokens == at + 1 and len(req.prompt_ids) <= at:
                    req.recompute()
        for req in self.running:  # decodes first: one token each
            if not req.in_prefill and budget > 0:
                batch.steps.append((req, 1))
                budget -= 1
        for req in self.running:  # then prompt chunks already under way
            if req.in_prefill and budget > 0:
                n = len(req.next_tokens(budget))
                batch.steps.append((req, n))
                budget -= n
        self._admit(batch, budget)
        batch.steps.sort(key=lambda step: step[0].sort_slot)  # runs of equal adapter for the LoRA op
        return batch

    def busy_slots(self) -> Counter[int]:
        """Running requests per adapter slot: those slots are never given to another adapter."""
        return Counter(slot for req in self.running for slot in req.slots)

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        still_waiting: deque[Request] = deque()
        # Once an older request waits for a free slot, newer ones may only use adapters already on a slot:
        # slots are handed out in arrival order, so a composition needing several is not starved.
        slots_reserved = False
        # Queued requests that cannot start this step have their adapters read into host memory meanwhile
        # (at most a batch's worth of them), so a load never waits for a free sequence slot to begin.
        look_ahead = self.config.max_num_seqs
        busy = self.busy_slots()
        try:
            while self.waiting:
                req = self.waiting.popleft()
                full = budget <= 0 or len(self.running) >= self.config.max_num_seqs
                if full or not self.blocks.can_allocate(req.max_total_tokens):
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
                req.blocks = self.blocks.allocate(req.max_total_tokens)
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                n = len(req.next_tokens(budget))
                batch.steps.append((req, n))
                budget -= n
        finally:  # whatever happens, no waiting request is lost
            still_waiting.extend(self.waiting)
            self.waiting = still_waiting

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
