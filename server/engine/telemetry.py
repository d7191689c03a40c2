"""What the engine thread reports to the metrics: request latencies, step shapes, and engine state."""

from __future__ import annotations

import time

from server.engine.adapter_cache import AdapterCache
from server.engine.request import FinishReason, Request
from server.engine.scheduler import ScheduledBatch, Scheduler
from server.metrics import Metrics

_OUTCOMES = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.ABORT: "abort",
    FinishReason.ERROR: "error",
}


class Telemetry:
    def __init__(self, metrics: Metrics, scheduler: Scheduler, cache: AdapterCache) -> None:
        self.metrics = metrics
        self.scheduler = scheduler
        self.cache = cache

    def accepted(self, req: Request) -> None:
        """A request arrived: where each of its adapters was found."""
        for tier in (req.adapter_tier or "").split(","):
            if tier:
                self.metrics.adapter_lookup(tier)

    def scheduled(self, batch: ScheduledBatch, now: float) -> None:
        for req, _ in batch.steps:
            if req.admitted_at is None:
                req.admitted_at = now
                self.metrics.admitted(req.adapter_kind, now - req.arrival)

    def token(self, req: Request, now: float) -> None:
        if req.first_token_at is None:
            req.first_token_at = now
            admitted = req.admitted_at if req.admitted_at is not None else now
            self.metrics.first_token(req.adapter_kind, now - req.arrival, now - admitted, _name(req))
        elif req.last_token_at is not None:
            self.metrics.next_token(req.adapter_kind, now - req.last_token_at)
        req.last_token_at = now

    def finished(self, req: Request, reason: FinishReason) -> None:
        now = time.monotonic()
        n = len(req.output_ids)
        tpot = None
        if n > 1 and req.first_token_at is not None and req.last_token_at is not None:
            tpot = (req.last_token_at - req.first_token_at) / (n - 1)
        self.metrics.finished(
            req.adapter_kind, _OUTCOMES[reason], now - req.arrival, tpot, len(req.prompt_ids), n, _name(req)
        )

    def stepped(self, batch: ScheduledBatch, phases: dict[str, float]) -> None:
        slots = {req.slot for req, _ in batch.steps if req.slot >= 0}
        slots.update(s for req, _ in batch.steps for s in req.composed_slots)
        self.metrics.step(len(batch.steps), sum(n for _, n in batch.steps), len(slots), phases)

    def state(self) -> None:
        """Gauges of the engine's state, after each step (and when idle)."""
        s, cache = self.scheduler, self.cache
        waiting_adapters = {a for req in s.waiting for a in req.adapters}
        not_resident = {a for a in waiting_adapters if cache.tier(a) != "device"}
        blocks = s.blocks
        self.metrics.engine_state(
            running=len(s.running),
            waiting=len(s.waiting),
            adapters_waiting=len(not_resident),
            slots_used=cache.slots_in_use,
            slots_total=cache.slots.num_slots,
            host_bytes=cache.host_bytes,
            host_limit=cache.host_bytes_limit,
            kv_usage=blocks.used_blocks / blocks.num_blocks if blocks.num_blocks else 0.0,
        )
        if self.metrics.config.vllm_compatible:
            running = {a.name for req in s.running for a in req.adapters}
            self.metrics.lora_requests(running, {a.name for a in waiting_adapters}, cache.slots.num_slots)


def _name(req: Request) -> str | None:
    return req.adapter.name if req.adapter is not None else None
