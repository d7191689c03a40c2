"""What the engine thread reports to the metrics: request latencies, step shapes, and engine state.

A fault in here is logged and never reaches the engine: metrics must not fail a request.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from server.engine.request import FinishReason, Request
from server.engine.scheduler import ScheduledBatch, Scheduler
from server.metrics import Metrics

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., None])
_OUTCOMES = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.ABORT: "abort",
    FinishReason.ERROR: "error",
}


def _guarded(fn: F) -> F:
    @functools.wraps(fn)
    def call(*args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            log.exception("metrics: %s failed", fn.__name__)

    return call  # type: ignore[return-value]


class Telemetry:
    def __init__(self, metrics: Metrics, scheduler: Scheduler) -> None:
        self.metrics = metrics
        self.scheduler = scheduler

    @_guarded
    def accepted(self, req: Request) -> None:
        """A request arrived: where each of its adapters was found."""
        for tier in req.tiers:
            self.metrics.adapter_lookup(tier)

    @_guarded
    def scheduled(self, batch: ScheduledBatch, now: float) -> None:
        """After admission: queue times, and the engine's gauges at their fullest point of the step."""
        caching = self.scheduler.blocks.caching
        for req, _ in batch.steps:
            if req.admitted_at is None:
                req.admitted_at = now
                self.metrics.admitted(req.selection.kind, now - req.arrival)
                if caching:
                    self.metrics.prefix_cache(len(req.prompt_ids), req.cached_tokens or 0)
        self._state()

    @_guarded
    def preempted(self, n: int) -> None:
        self.metrics.preempted(n)

    @_guarded
    def token(self, req: Request, now: float) -> None:
        kind = req.selection.kind
        if req.first_token_at is None:
            req.first_token_at = now
            admitted = req.admitted_at if req.admitted_at is not None else now
            self.metrics.first_token(kind, now - req.arrival, now - admitted, len(req.prompt_ids), _name(req))
        elif req.last_token_at is not None:
            self.metrics.next_token(kind, now - req.last_token_at)
        self.metrics.generated(kind)
        req.last_token_at = now

    @_guarded
    def finished(self, req: Request, reason: FinishReason) -> None:
        now = time.monotonic()
        if req.admitted_at is None:  # it never ran: its whole life was queue time
            self.metrics.admitted(req.selection.kind, now - req.arrival)
        n = len(req.output_ids)
        tpot = None
        if n > 1 and req.first_token_at is not None and req.last_token_at is not None:
            tpot = (req.last_token_at - req.first_token_at) / (n - 1)
        self.metrics.finished(req.selection.kind, _OUTCOMES[reason], now - req.arrival, tpot, _name(req))

    @_guarded
    def stepped(self, batch: ScheduledBatch, phases: dict[str, float]) -> None:
        slots = {s for req, _ in batch.steps for s in req.slots}
        self.metrics.step(len(batch.steps), sum(n for _, n in batch.steps), len(slots), phases)

    @_guarded
    def state(self) -> None:
        """Gauges of the engine's state (an empty step: idle, or everything waits)."""
        self._state()

    def _state(self) -> None:
        s = self.scheduler
        residency = s.residency
        waiting_adapters = {a for req in s.waiting for a in req.adapters}
        blocks = s.blocks
        self.metrics.engine_state(
            running=len(s.running),
            waiting=len(s.waiting),
            adapters_waiting=sum(1 for a in waiting_adapters if residency.tier(a) == "host"),
            slots_used=residency.slots_in_use(s.busy_slots()),
            slots_total=residency.slots.num_slots,
            host_bytes=residency.host_bytes,
            host_limit=residency.host_bytes_limit,
            kv_usage=blocks.used_blocks / blocks.num_blocks if blocks.num_blocks else 0.0,
        )
        if self.metrics.lora_requests_due():
            running = {a.name for req in s.running for a in req.adapters}
            self.metrics.lora_requests(running, {a.name for a in waiting_adapters}, residency.slots.num_slots)


def _name(req: Request) -> str | None:
    single = req.selection.single
    return single.name if single is not None else None
