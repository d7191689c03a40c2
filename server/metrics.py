"""Prometheus metrics: every name the server exports, in one place.

Prefix ``loraplex_``, units in names (``_seconds``, ``_bytes``, ``_total``), no
colons (those are for recording rules), and latencies labelled by
``adapter_kind`` (``base``, ``adapter``, ``composed``) so latency with and
without adapters sits side by side. Each server has its own registry.

The ``adapter`` label is on by default and bounded: the top K adapters by
recent traffic (K = ``DEFAULT_TOP_K`` unless configured; 0 turns the label
off), or instead exactly the names on a configured allow-list; everything
else is counted as ``other``, and ``loraplex_adapter_label_folded_total``
counts what was folded. The top set is re-chosen every ``REBALANCE_EVERY``
requests, and the series of an adapter that leaves it are removed, so no
labelled metric ever holds more than K + 1 label values (allow-list: its
length + 1). With a metric's other labels, ``loraplex_adapter_requests_total``
holds at most (K + 1) x 5 outcomes series, each per-adapter histogram K + 1.

Most updates happen on the engine thread, a few on the HTTP side; the
prometheus_client metrics are thread-safe.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter as Tally
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # no ``_created`` series: they double the exposition and no dashboard reads them

ADAPTER_KINDS = ("base", "adapter", "composed")
OUTCOMES = ("stop", "length", "abort", "error", "rejected")
TIERS = ("device", "host", "disk")
EVICTION_REASONS = ("lru", "admin", "delete", "replaced")
STEP_PHASES = ("schedule", "forward", "sample", "emit")
OTHER = "other"
REBALANCE_EVERY = 1000  # requests between re-choices of the top-K adapter set
DEFAULT_TOP_K = 10  # adapters with their own ``adapter`` label value when neither a K nor an allow-list is given

# From 1 ms: a decode step of a small model on a CPU is a few ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                 1.0, 2.5, 5.0)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    adapter_allowlist: tuple[str, ...] = ()  # adapters that get their own ``adapter`` label value
    # or: the K busiest adapters get one; None = DEFAULT_TOP_K, or 0 with an allow-list; 0 = none
    adapter_top_k: int | None = None
    vllm_compatible: bool = False  # also export vLLM's queue and LoRA gauges (``vllm:`` names)

    def __post_init__(self) -> None:
        if self.adapter_top_k is not None and not 0 <= self.adapter_top_k <= 100:
            raise ValueError("adapter_top_k must be 0..100 (the adapter label must stay small)")
        if self.adapter_allowlist and self.adapter_top_k:
            raise ValueError("give --metrics-adapters (an allow-list) or --metrics-top-k, not both; the allow-list "
                             "alone replaces the default top-K")
        if len(self.adapter_allowlist) > 100:
            raise ValueError("at most 100 adapters on the metrics allow-list")
        if OTHER in self.adapter_allowlist:
            raise ValueError(f"{OTHER!r} is the label of every unlisted adapter; it cannot be on the allow-list")

    @property
    def top_k(self) -> int:
        """The K in force: the configured one, else 0 beside an allow-list, else ``DEFAULT_TOP_K``."""
        if self.adapter_top_k is not None:
            return self.adapter_top_k
        return 0 if self.adapter_allowlist else DEFAULT_TOP_K

    @property
    def adapter_label(self) -> bool:
        return bool(self.adapter_allowlist or self.top_k)


class AdapterLabels:
    """Maps adapter names onto a bounded label set; ``on_drop`` is told of names leaving the top-K set."""

    def __init__(self, allowlist: tuple[str, ...], top_k: int) -> None:
        self.allow = frozenset(allowlist)
        self.top_k = top_k
        self.current: set[str] = set()
        self._traffic: Tally[str] = Tally()
        self._seen = 0

    def peek(self, name: str) -> str:
        """The label for ``name`` without counting a request (a new name still takes a free top-K place)."""
        if self.allow:
            return name if name in self.allow else OTHER
        if name not in self.current and len(self.current) < self.top_k:
            self.current.add(name)
        return name if name in self.current else OTHER

    def label(self, name: str) -> tuple[str, frozenset[str]]:
        """The label for ``name``, and the names whose series must be removed now."""
        if self.allow:
            return (name if name in self.allow else OTHER), frozenset()
        self._traffic[name] += 1
        self._seen += 1
        dropped: frozenset[str] = frozenset()
        if self._seen % REBALANCE_EVERY == 0:
            top = {n for n, _ in self._traffic.most_common(self.top_k)}
            dropped = frozenset(self.current - top)
            self.current = top
            self._traffic = Tally({n: c // 2 for n, c in self._traffic.items() if c // 2})  # favour recent traffic
        if name not in self.current and len(self.current) < self.top_k:
            self.current.add(name)
        return (name if name in self.current else OTHER), dropped


class Metrics:
    def __init__(self, config: MetricsConfig | None = None) -> None:
        self.config = config or MetricsConfig()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        kind = ["adapter_kind"]

        def hist(name: str, doc: str, labels: list[str], buckets=LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        self.ttft = hist("loraplex_time_to_first_token_seconds", "Arrival to first output token.", kind)
        self.itl = hist("loraplex_inter_token_latency_seconds", "Time between two output tokens.", kind,
                        TOKEN_BUCKETS)
        self.tpot = hist("loraplex_time_per_output_token_seconds",
                         "Per request: (last token - first token) / (output tokens - 1).", kind, TOKEN_BUCKETS)
        self.e2e = hist("loraplex_e2e_request_latency_seconds", "Arrival to the end of the request.", kind)
        self.queue = hist("loraplex_request_queue_time_seconds", "Arrival to admission into the running batch.", kind)
        self.prefill = hist("loraplex_request_prefill_time_seconds", "Admission to the first output token.", kind)
        self.requests = Counter("loraplex_requests_total", "Requests by adapter kind and outcome.",
                                ["adapter_kind", "outcome"], registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens_total", "Prompt tokens of finished requests.", kind,
                                     registry=r)
        self.generation_tokens = Counter("loraplex_generation_tokens_total", "Output tokens generated.", kind,
                                         registry=r)
        self.lookups = Counter("loraplex_adapter_cache_lookups_total",
                               "Adapter lookups at request arrival, by the tier looked in.", ["tier"], registry=r)
        self.hits = Counter("loraplex_adapter_cache_hits_total",
                            "Adapter lookups that found the adapter in that tier.", ["tier"], registry=r)
        self.loads = Counter("loraplex_adapter_loads_total",
                             "Adapter loads into a tier (host: read from disk; device: copied into a slot).",
                             ["tier", "result"], registry=r)
        self.load_time = hist("loraplex_adapter_load_seconds", "Time to load an adapter into a tier.", ["tier"],
                              LOAD_BUCKETS)
        self.evictions = Counter("loraplex_adapter_evictions_total", "Adapters dropped from a tier.",
                                 ["tier", "reason"], registry=r)
        self.slot_waits = Counter("loraplex_adapter_slot_waits_total",
                                  "Times a waiting request's adapter, in host memory, found no free device slot "
                                  "(once per engine step it waits).", registry=r)
        self.batch_seqs = hist("loraplex_batch_size_sequences", "Sequences in one engine step.", [], COUNT_BUCKETS)
        self.batch_tokens = hist("loraplex_batch_size_tokens", "Tokens in one engine step.", [], COUNT_BUCKETS)
        self.batch_adapters = hist("loraplex_batch_distinct_adapters", "Distinct adapters in one engine step.", [],
                                   (0, 1, 2, 4, 8, 16, 32, 64, 128))
        self.step_time = hist("loraplex_engine_step_seconds", "Engine step time by phase.", ["phase"],
                              TOKEN_BUCKETS)
        self.running = Gauge("loraplex_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("loraplex_requests_waiting", "Requests waiting to run.", registry=r)
        self.adapters_waiting = Gauge("loraplex_adapters_waiting_for_slot",
                                      "Distinct adapters of waiting requests loaded in host memory but on no device "
                                      "slot.", registry=r)
        self.slots_used = Gauge("loraplex_adapter_slots_used", "Device adapter slots held (running or pinned).",
                                registry=r)
        self.slots_total = Gauge("loraplex_adapter_slots_capacity", "Device adapter slots (used + free).", registry=r)
        self.host_bytes = Gauge("loraplex_adapter_host_cache_bytes", "Adapter bytes in host memory.", registry=r)
        self.host_limit = Gauge("loraplex_adapter_host_cache_limit_bytes", "Host-memory adapter cache bound.",
                                registry=r)
        self.stored = Gauge("loraplex_adapters_stored", "Adapters in the store.", registry=r)
        self.kv_usage = Gauge("loraplex_kv_cache_usage_ratio",
                              "Share of KV-cache blocks held by running requests (0..1; cached free blocks are "
                              "not counted).", registry=r)
        self.prefix_queries = Counter("loraplex_prefix_cache_queries_tokens_total",
                                      "Prompt tokens looked up in the prefix cache (once per request).", registry=r)
        self.prefix_hits = Counter("loraplex_prefix_cache_hits_tokens_total",
                                   "Prompt tokens whose K/V the prefix cache held.", registry=r)
        self.preemptions = Counter("loraplex_preemptions_total",
                                   "Running requests sent back to the queue to free KV blocks.", registry=r)
        self._labels: AdapterLabels | None = None
        if self.config.adapter_label:
            self._labels = AdapterLabels(self.config.adapter_allowlist, self.config.top_k)
            self.adapter_requests = Counter("loraplex_adapter_requests_total",
                                            "Requests by adapter (bounded label; others are 'other').",
                                            ["adapter", "outcome"], registry=r)
            self.adapter_ttft = hist("loraplex_adapter_time_to_first_token_seconds",
                                     "Time to first token by adapter (bounded label).", ["adapter"])
            self.adapter_e2e = hist("loraplex_adapter_e2e_request_latency_seconds",
                                    "End-to-end latency by adapter (bounded label).", ["adapter"])
            self.folded = Counter("loraplex_adapter_label_folded_total",
                                  "Requests whose adapter was counted as 'other'.", registry=r)
        if self.config.vllm_compatible:
            self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting (vLLM's name).",
                                      ["model_name"], registry=r)
            self.vllm_running = Gauge("vllm:num_requests_running", "Requests running (vLLM's name).",
                                      ["model_name"], registry=r)
            self.vllm_kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 1 = full (vLLM's name).",
                                       ["model_name"], registry=r)
            self.vllm_prefix_queries = Counter("vllm:prefix_cache_queries", "Prefix-cache queries in tokens "
                                               "(vLLM's name).", ["model_name"], registry=r)
            self.vllm_prefix_hits = Counter("vllm:prefix_cache_hits", "Prefix-cache hits in tokens (vLLM's name).",
                                            ["model_name"], registry=r)
            self.vllm_preemptions = Counter("vllm:num_preemptions", "Preemptions (vLLM's name).", ["model_name"],
                                            registry=r)
            self.vllm_lora = Gauge("vllm:lora_requests_info", "Running stats on LoRA requests (vLLM's semantics).",
                                   ["running_lora_adapters", "waiting_lora_adapters", "max_lora"], registry=r)
        self._last_lora_info = -1.0
        self._lora_labels: tuple[str, str, str] | None = None
        self.model_name = ""
        for k in ADAPTER_KINDS:  # every series exists from the start, so rates and ratios are never empty
            for outcome in OUTCOMES:
                self.requests.labels(k, outcome)
            for m in (self.ttft, self.itl, self.tpot, self.e2e, self.queue, self.prefill,
                      self.prompt_tokens, self.generation_tokens):
                m.labels(k)
        for tier in TIERS:
            self.lookups.labels(tier)
            self.hits.labels(tier)
        for tier in ("host", "device"):
            self.load_time.labels(tier)
            for result in ("ok", "failed"):
                self.loads.labels(tier, result)
            for reason in EVICTION_REASONS:
                self.evictions.labels(tier, reason)
        for phase in STEP_PHASES:
            self.step_time.labels(phase)

    # -- requests (engine thread, except rejected) ---------------------------------

    def admitted(self, kind: str, queue_s: float) -> None:
        self.queue.labels(kind).observe(queue_s)

    def first_token(self, kind: str, ttft_s: float, prefill_s: float, prompt_tokens: int, adapter: str | None) -> None:
        """The prompt is processed (its tokens count now) and the first token is out."""
        self.ttft.labels(kind).observe(ttft_s)
        self.prefill.labels(kind).observe(prefill_s)
        self.prompt_tokens.labels(kind).inc(prompt_tokens)
        label = self._adapter_label(adapter, count=False)
        if label is not None:
            self.adapter_ttft.labels(label).observe(ttft_s)

    def next_token(self, kind: str, itl_s: float) -> None:
        self.itl.labels(kind).observe(itl_s)

    def generated(self, kind: str) -> None:
        """One output token (counted as it is produced, so tokens/s moves during long requests)."""
        self.generation_tokens.labels(kind).inc()

    def finished(self, kind: str, outcome: str, e2e_s: float, tpot_s: float | None, adapter: str | None) -> None:
        """Every ending is counted; latency only of requests that completed (``stop``, ``length``)."""
        self.requests.labels(kind, outcome).inc()
        completed = outcome in ("stop", "length")
        if completed:
            self.e2e.labels(kind).observe(e2e_s)
        if tpot_s is not None and completed:
            self.tpot.labels(kind).observe(tpot_s)
        label = self._adapter_label(adapter, count=True)
        if label is not None:
            self.adapter_requests.labels(label, outcome).inc()
            if completed:
                self.adapter_e2e.labels(label).observe(e2e_s)

    def rejected(self, kind: str) -> None:
        """Refused before reaching the engine (queue full, shutting down)."""
        self.requests.labels(kind, "rejected").inc()

    # -- engine steps and state ---------------------------------------------------

    def prefix_cache(self, queried: int, hit: int) -> None:
        """A request's first admission: its prompt tokens, and how many of them were cached."""
        self.prefix_queries.inc(queried)
        self.prefix_hits.inc(hit)
        if self.config.vllm_compatible:
            self.vllm_prefix_queries.labels(self.model_name).inc(queried)
            self.vllm_prefix_hits.labels(self.model_name).inc(hit)

    def preempted(self, n: int) -> None:
        self.preemptions.inc(n)
        if self.config.vllm_compatible:
            self.vllm_preemptions.labels(self.model_name).inc(n)

    def step(self, seqs: int, tokens: int, adapters: int, phases: dict[str, float]) -> None:
        self.batch_seqs.observe(seqs)
        self.batch_tokens.observe(tokens)
        self.batch_adapters.observe(adapters)
        for phase, seconds in phases.items():
            self.step_time.labels(phase).observe(seconds)

    def engine_state(
        self,
        running: int,
        waiting: int,
        adapters_waiting: int,
        slots_used: int,
        slots_total: int,
        host_bytes: int,
        host_limit: int,
        kv_usage: float,
    ) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.adapters_waiting.set(adapters_waiting)
        self.slots_used.set(slots_used)
        self.slots_total.set(slots_total)
        self.host_bytes.set(host_bytes)
        self.host_limit.set(host_limit)
        self.kv_usage.set(kv_usage)
        if self.config.vllm_compatible:
            self.vllm_waiting.labels(self.model_name).set(waiting)
            self.vllm_running.labels(self.model_name).set(running)
            self.vllm_kv_usage.labels(self.model_name).set(kv_usage)

    def lora_requests_due(self) -> bool:
        """Whether ``lora_requests_info`` is due an update (at most once a second)."""
        return self.config.vllm_compatible and time.monotonic() - self._last_lora_info >= 1.0

    def lora_requests(self, running: set[str], waiting: set[str], max_lora: int) -> None:
        """vLLM's ``lora_requests_info``: one series, the adapter sets as labels, the update time as value.

        The new series is set before the old one is removed, so a scrape never finds none.
        """
        self._last_lora_info = time.monotonic()
        labels = (",".join(sorted(running)), ",".join(sorted(waiting)), str(max_lora))
        self.vllm_lora.labels(*labels).set(time.time())
        if self._lora_labels is not None and self._lora_labels != labels:
            _remove(self.vllm_lora, *self._lora_labels)
        self._lora_labels = labels

    # -- adapter cache --------------------------------------------------------------

    def adapter_lookup(self, found: str) -> None:
        """An arriving request's adapter was found in tier ``found``; each tier above it was a miss."""
        for tier in TIERS:
            self.lookups.labels(tier).inc()
            if tier == found:
                self.hits.labels(tier).inc()
                return

    def adapter_loaded(self, tier: str, seconds: float, ok: bool) -> None:
        self.loads.labels(tier, "ok" if ok else "failed").inc()
        if ok:
            self.load_time.labels(tier).observe(seconds)

    def slot_wait(self) -> None:
        self.slot_waits.inc()

    def adapter_evicted(self, tier: str, reason: str) -> None:
        self.evictions.labels(tier, reason).inc()

    def _adapter_label(self, adapter: str | None, count: bool) -> str | None:
        if self._labels is None or adapter is None:
            return None
        if not count:
            return self._labels.peek(adapter)
        label, dropped = self._labels.label(adapter)
        for name in dropped:
            _remove(self.adapter_ttft, name)
            _remove(self.adapter_e2e, name)
            for outcome in OUTCOMES:
                _remove(self.adapter_requests, name, outcome)
        if label == OTHER:
            self.folded.inc()
        return label


def _remove(metric: Counter | Histogram, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # that series was never written
        metric.remove(*labels)
