"""The metrics module on its own: bounded adapter labels, config validation, cache counters, vLLM's LoRA gauge,
names and buckets."""

from __future__ import annotations

import itertools
import random
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

import server.metrics as metrics_module
from adapters_store.backend import StoredAdapter
from server.adapters.residency import Outcome, Residency
from server.metrics import DEFAULT_TOP_K, OTHER, REBALANCE_EVERY, Metrics, MetricsConfig
from tests.helpers.residency import residency, weights

PER_ADAPTER = ("loraplex_adapter_requests_total", "loraplex_adapter_time_to_first_token_seconds",
               "loraplex_adapter_e2e_request_latency_seconds")


def value(m: Metrics, name: str, **labels: str) -> float:
    got = m.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def adapter_values(m: Metrics, family: str) -> set[str]:
    """The ``adapter`` label values live in one per-adapter metric family."""
    metric = {PER_ADAPTER[0]: m.adapter_requests, PER_ADAPTER[1]: m.adapter_ttft, PER_ADAPTER[2]: m.adapter_e2e}[family]
    return {s.labels["adapter"] for f in metric.collect() for s in f.samples}


def request(m: Metrics, adapter: str, outcome: str = "stop") -> None:
    """What the engine reports for one adapter request, in its order: first token, then the end."""
    m.first_token("adapter", 0.02, 0.01, 7, adapter)
    for _ in range(5):
        m.generated("adapter")
    m.finished("adapter", outcome, 0.2, 0.01, adapter)


def families(m: Metrics) -> dict[str, object]:
    return {f.name: f for f in m.registry.collect()}


# -- the bounded adapter label ------------------------------------------------------------------------


def test_allow_list_labels_only_listed_adapters_and_counts_the_folded():
    m = Metrics(MetricsConfig(adapter_allowlist=("alpha", "beta")))
    for name in ("alpha", "beta", "alpha", "gamma", "delta", "gamma"):
        request(m, name)
    m.finished("base", "stop", 0.1, None, None)  # a base request has no adapter: neither labelled nor folded
    for family in PER_ADAPTER:
        assert adapter_values(m, family) == {"alpha", "beta", OTHER}, family
    assert value(m, "loraplex_adapter_requests_total", adapter="alpha", outcome="stop") == 2
    assert value(m, "loraplex_adapter_requests_total", adapter="beta", outcome="stop") == 1
    assert value(m, "loraplex_adapter_requests_total", adapter=OTHER, outcome="stop") == 3
    assert value(m, "loraplex_adapter_label_folded_total") == 3
    assert value(m, "loraplex_adapter_e2e_request_latency_seconds_count", adapter=OTHER) == 3
    assert value(m, "loraplex_adapter_time_to_first_token_seconds_count", adapter="alpha") == 2


def test_the_adapter_label_is_on_by_default_with_the_ten_busiest():
    """A default install labels the DEFAULT_TOP_K (10) busiest adapters; the 11th and later are 'other'."""
    m = Metrics()
    assert m.config.top_k == DEFAULT_TOP_K == 10
    names = [f"a{i:02d}" for i in range(12)]
    for name in names:
        request(m, name)
    for family in PER_ADAPTER:
        assert adapter_values(m, family) == {*names[:10], OTHER}, family
    assert value(m, "loraplex_adapter_label_folded_total") == 2
    assert not any(n.startswith("vllm:") for n in families(m))


def test_top_k_zero_turns_the_adapter_label_off():
    names = set(families(Metrics(MetricsConfig(adapter_top_k=0))))
    assert not any(n.startswith("loraplex_adapter_requests") or "folded" in n for n in names), names


def test_top_k_never_holds_more_than_k_plus_one_label_values():
    """10,000 requests over 500 adapters, zipf-skewed, with the popular set moving twice: ten rebalances."""
    k = 5
    m = Metrics(MetricsConfig(adapter_top_k=k))
    rng = random.Random(7)
    names = [f"adapter-{i:03d}" for i in range(500)]
    cum = list(itertools.accumulate(1.0 / (i + 1) ** 1.1 for i in range(500)))
    offset = 0
    for i in range(10_000):
        if i in (3_500, 7_000):
            offset += 100  # a different crowd becomes popular
        rank = rng.choices(range(500), cum_weights=cum)[0]
        request(m, names[(rank + offset) % 500])
        live = adapter_values(m, "loraplex_adapter_requests_total")
        assert len(live) <= k + 1, (i, live)
        near_rebalance = i % REBALANCE_EVERY in (REBALANCE_EVERY - 2, REBALANCE_EVERY - 1, 0, 1)
        if near_rebalance or i % 37 == 0:
            for family in PER_ADAPTER[1:]:
                live = adapter_values(m, family)
                assert len(live) <= k + 1, (i, family, live)
    assert len(m._labels.current) == k
    assert names[offset] in m._labels.current  # the busiest of the last crowd holds a label
    assert names[0] not in m._labels.current  # the busiest of the first crowd gave its label up
    # Everything counted as ``other`` was counted as folded (the ``other`` series is never removed).
    assert value(m, "loraplex_adapter_label_folded_total") == value(
        m, "loraplex_adapter_requests_total", adapter=OTHER, outcome="stop")


def test_after_a_rebalance_the_busiest_hold_the_labels_and_the_others_series_are_gone():
    k = 3
    m = Metrics(MetricsConfig(adapter_top_k=k))
    early = ["rare-0", "rare-1", "rare-2"]  # seen first: they take the K labels while the set is filling
    for name in early:
        request(m, name)
    assert adapter_values(m, "loraplex_adapter_requests_total") == set(early)
    busy = {"busy-0": 400, "busy-1": 300, "busy-2": 200, "calm-3": 50}
    busy["calm-4"] = REBALANCE_EVERY - len(early) - sum(busy.values()) - 1
    sequence = [name for name, n in busy.items() for _ in range(n)]
    random.Random(1).shuffle(sequence)
    for name in sequence:
        request(m, name)
        assert adapter_values(m, "loraplex_adapter_requests_total") <= {*early, OTHER}  # not yet re-chosen
    request(m, "calm-3")  # request number REBALANCE_EVERY: the top set is re-chosen
    for family in PER_ADAPTER:
        assert not adapter_values(m, family) & set(early), family  # the series of those that left are removed
    for name in ("busy-0", "busy-1", "busy-2"):
        request(m, name)
        assert value(m, "loraplex_adapter_requests_total", adapter=name, outcome="stop") == 1
    for family in PER_ADAPTER[::2]:  # requests and e2e: both written at the end of a request
        assert adapter_values(m, family) == {"busy-0", "busy-1", "busy-2", OTHER}, family
    request(m, "calm-4")
    assert value(m, "loraplex_adapter_requests_total", adapter="calm-4", outcome="stop") == 0


def test_an_adapters_first_request_is_labelled_alike_in_every_per_adapter_metric():
    """The first request of an adapter that takes a free top-K label: its TTFT and its end-to-end latency must
    land in the same series (otherwise each adapter's cold first request, the one that loads it from disk,
    is booked under ``other`` for TTFT but under its own name for requests and e2e)."""
    m = Metrics(MetricsConfig(adapter_top_k=2))
    request(m, "cold")
    requests = value(m, "loraplex_adapter_requests_total", adapter="cold", outcome="stop")
    e2e = value(m, "loraplex_adapter_e2e_request_latency_seconds_count", adapter="cold")
    ttft = value(m, "loraplex_adapter_time_to_first_token_seconds_count", adapter="cold")
    assert requests == e2e == 1
    assert ttft == requests, f"TTFT of the adapter's first request went to {adapter_values(m, PER_ADAPTER[1])}"


# -- config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"adapter_top_k": -1}, "adapter_top_k"),
        ({"adapter_top_k": 101}, "adapter_top_k"),
        ({"adapter_allowlist": ("a",), "adapter_top_k": 3}, "not both"),
        ({"adapter_allowlist": tuple(f"a{i}" for i in range(101))}, "at most 100"),
    ],
)
def test_metrics_config_refuses_unbounded_or_ambiguous_labels(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        MetricsConfig(**kwargs)


def test_metrics_config_defaults_and_the_adapter_label_switch():
    default = MetricsConfig()
    assert default.enabled and not default.vllm_compatible and default.adapter_label and default.top_k == 10
    # An allow-list alone replaces the default top-K (no error, no top-K beside it).
    assert MetricsConfig(adapter_allowlist=("a",)).top_k == 0
    assert MetricsConfig(adapter_allowlist=("a",), adapter_top_k=0).top_k == 0
    assert MetricsConfig(adapter_top_k=100).adapter_label
    assert MetricsConfig(adapter_allowlist=tuple(f"a{i}" for i in range(100))).adapter_label
    assert not MetricsConfig(adapter_top_k=0, adapter_allowlist=()).adapter_label


# -- adapter cache counters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("found", "lookups", "hits"),
    [
        ("device", {"device": 1, "host": 0, "disk": 0}, {"device": 1, "host": 0, "disk": 0}),
        ("host", {"device": 1, "host": 1, "disk": 0}, {"device": 0, "host": 1, "disk": 0}),
        ("disk", {"device": 1, "host": 1, "disk": 1}, {"device": 0, "host": 0, "disk": 1}),
    ],
)
def test_a_lookup_counts_every_tier_looked_in_and_a_hit_where_found(found, lookups, hits):
    m = Metrics()
    m.adapter_lookup(found)
    assert {t: value(m, "loraplex_adapter_cache_lookups_total", tier=t) for t in lookups} == lookups
    assert {t: value(m, "loraplex_adapter_cache_hits_total", tier=t) for t in hits} == hits


def _cache(m: Metrics, slots: int, host_bytes: int) -> Residency:
    made = residency(slots, host_bytes)
    made.metrics = m
    made.loader.broken.add("broken")
    return made


def _ready(cache: Residency, name: str, busy: Counter[int] | None = None) -> int:
    got = cache.acquire(StoredAdapter(name, "v1", Path("/store") / name), busy or Counter())
    assert got.outcome is not Outcome.LOADING, f"{name} never loaded"
    return got.slot if got.outcome is Outcome.READY else -1


def test_cache_reports_loads_and_lru_evictions_in_both_tiers():
    m = Metrics()
    nbytes = weights(1.0).nbytes  # one adapter's A and B^T in fp32
    cache = _cache(m, slots=2, host_bytes=2 * nbytes)  # two slots, room for two adapters in host memory
    try:
        for name in ("a", "b"):
            _ready(cache, name)
        assert value(m, "loraplex_adapter_loads_total", tier="host", result="ok") == 2
        assert value(m, "loraplex_adapter_loads_total", tier="device", result="ok") == 2
        assert value(m, "loraplex_adapter_load_seconds_count", tier="host") == 2
        assert value(m, "loraplex_adapter_evictions_total", tier="device", reason="lru") == 0
        _ready(cache, "c")  # a third: the LRU slot (a's) and the LRU host copy (a's) go
        assert value(m, "loraplex_adapter_evictions_total", tier="device", reason="lru") == 1
        assert value(m, "loraplex_adapter_evictions_total", tier="host", reason="lru") == 1
        assert _ready(cache, "broken") == -1
        assert value(m, "loraplex_adapter_loads_total", tier="host", result="failed") == 1
        assert value(m, "loraplex_adapter_load_seconds_count", tier="host") == 3  # failures are not timed
        assert cache.evict("c").result(0) is None  # the default reason: an operator's evict
        assert value(m, "loraplex_adapter_evictions_total", tier="device", reason="admin") == 1
        assert value(m, "loraplex_adapter_evictions_total", tier="host", reason="admin") == 1
        cache.evict("b", reason="delete").result(0)
        assert value(m, "loraplex_adapter_evictions_total", tier="device", reason="delete") == 1
        assert value(m, "loraplex_adapter_evictions_total", tier="host", reason="delete") == 1
        _ready(cache, "d")  # onto the slot the evictions freed: nothing is evicted for it
        assert value(m, "loraplex_adapter_evictions_total", tier="device", reason="lru") == 1
    finally:
        cache.close()


# -- vLLM's lora_requests_info ----------------------------------------------------------------------


def _lora_info(m: Metrics) -> list:
    return [s for s in families(m)["vllm:lora_requests_info"].samples]


def test_lora_requests_info_is_one_series_with_vllms_labels_and_the_time_as_value():
    m = Metrics(MetricsConfig(vllm_compatible=True))
    m.lora_requests({"zeta", "alpha", "mid"}, {"waits-b", "waits-a"}, 8)
    (sample,) = _lora_info(m)
    assert sample.name == "vllm:lora_requests_info"
    assert sample.labels == {"running_lora_adapters": "alpha,mid,zeta", "waiting_lora_adapters": "waits-a,waits-b",
                             "max_lora": "8"}
    assert abs(sample.value - time.time()) < 5


def test_lora_requests_info_replaces_its_series_as_the_sets_change(monkeypatch):
    clock = [1_000.0]
    monkeypatch.setattr(metrics_module, "time", SimpleNamespace(time=lambda: clock[0], monotonic=lambda: clock[0]))
    m = Metrics(MetricsConfig(vllm_compatible=True))
    for running, waiting in (({"a"}, set()), ({"a", "b"}, {"c"}), (set(), set())):
        clock[0] += 2.0
        assert m.lora_requests_due()
        m.lora_requests(running, waiting, 4)
        clock[0] += 0.5
        assert not m.lora_requests_due()  # at most once a second
        (sample,) = _lora_info(m)
        assert sample.labels["running_lora_adapters"] == ",".join(sorted(running))
        assert sample.labels["waiting_lora_adapters"] == ",".join(sorted(waiting))
        assert sample.value == clock[0] - 0.5


def test_vllm_queue_gauges_carry_the_model_name():
    m = Metrics(MetricsConfig(vllm_compatible=True))
    m.model_name = "tiny"
    m.engine_state(running=3, waiting=2, adapters_waiting=1, slots_used=1, slots_total=4, host_bytes=10,
                   host_limit=100, kv_usage=0.25)
    assert value(m, "vllm:num_requests_running", model_name="tiny") == 3
    assert value(m, "vllm:num_requests_waiting", model_name="tiny") == 2
    assert value(m, "loraplex_kv_cache_usage_ratio") == 0.25
    assert value(m, "vllm:kv_cache_usage_perc", model_name="tiny") == 0.25  # vLLM's name, also a fraction
    plain = Metrics()
    assert not plain.lora_requests_due()  # never due without the vLLM subset
    assert not any(n.startswith("vllm:") for n in families(plain))


# -- names and buckets --------------------------------------------------------------------------------------


ALL_ON = [MetricsConfig(), MetricsConfig(adapter_top_k=5, vllm_compatible=True),
          MetricsConfig(adapter_allowlist=("a",))]


@pytest.mark.parametrize("config", ALL_ON, ids=["default", "top-k+vllm", "allow-list"])
def test_names_have_our_prefix_and_no_colon_but_vllms(config):
    m = Metrics(config)
    for fam in m.registry.collect():
        for sample in fam.samples:
            if sample.name.startswith("vllm:"):
                assert config.vllm_compatible
                assert ":" not in sample.name.removeprefix("vllm:"), sample.name
                continue
            assert sample.name.startswith("loraplex_"), sample.name
            assert ":" not in sample.name, sample.name
            assert not sample.name.endswith("_created"), sample.name


def test_every_latency_histogram_starts_at_a_millisecond_or_below():
    m = Metrics(MetricsConfig(adapter_top_k=5, vllm_compatible=True))
    request(m, "some-adapter")  # the per-adapter histograms have series only once written
    histograms = [f for f in m.registry.collect() if f.type == "histogram"]
    assert len(histograms) >= 13
    for fam in histograms:
        bounds = sorted({float(s.labels["le"]) for s in fam.samples if s.name.endswith("_bucket")})
        if fam.name.endswith("_seconds"):
            assert bounds and bounds[0] <= 0.001, (fam.name, bounds[:3])
        assert bounds[-1] == float("inf"), fam.name


def test_every_labelled_series_exists_from_the_start():
    """Rates and ratios over kinds, outcomes and tiers are never empty on a fresh server."""
    m = Metrics()
    for kind in ("base", "adapter", "composed"):
        for outcome in ("stop", "length", "abort", "error", "rejected"):
            assert m.registry.get_sample_value("loraplex_requests_total",
                                               {"adapter_kind": kind, "outcome": outcome}) == 0
        assert m.registry.get_sample_value("loraplex_time_to_first_token_seconds_count", {"adapter_kind": kind}) == 0
    for tier in ("device", "host", "disk"):
        assert m.registry.get_sample_value("loraplex_adapter_cache_hits_total", {"tier": tier}) == 0


# -- request latencies: what is observed, and when ----------------------------------------------------------


@pytest.mark.parametrize("outcome", ["abort", "error"])
def test_a_request_that_did_not_complete_is_counted_but_its_latency_is_not_observed(outcome):
    m = Metrics(MetricsConfig(adapter_top_k=3))
    m.first_token("adapter", 0.02, 0.01, 7, "x")
    m.generated("adapter")
    m.generated("adapter")
    m.finished("adapter", outcome, 9.0, 0.01, "x")
    assert value(m, "loraplex_requests_total", adapter_kind="adapter", outcome=outcome) == 1
    assert value(m, "loraplex_adapter_requests_total", adapter="x", outcome=outcome) == 1
    assert value(m, "loraplex_e2e_request_latency_seconds_count", adapter_kind="adapter") == 0
    assert value(m, "loraplex_time_per_output_token_seconds_count", adapter_kind="adapter") == 0
    assert value(m, "loraplex_adapter_e2e_request_latency_seconds_count", adapter="x") == 0
    # The tokens it did produce are counted: the prompt at its first token, each output token as it came.
    assert value(m, "loraplex_prompt_tokens_total", adapter_kind="adapter") == 7
    assert value(m, "loraplex_generation_tokens_total", adapter_kind="adapter") == 2
    for completed in ("stop", "length"):
        m.finished("adapter", completed, 0.5, 0.01, "x")
    assert value(m, "loraplex_e2e_request_latency_seconds_count", adapter_kind="adapter") == 2
    assert value(m, "loraplex_e2e_request_latency_seconds_sum", adapter_kind="adapter") == 1.0
    assert value(m, "loraplex_time_per_output_token_seconds_count", adapter_kind="adapter") == 2
    assert value(m, "loraplex_adapter_e2e_request_latency_seconds_count", adapter="x") == 2


def test_tokens_are_counted_as_they_are_produced_not_at_the_end():
    m = Metrics()
    m.first_token("base", 0.02, 0.01, 11, None)
    assert value(m, "loraplex_prompt_tokens_total", adapter_kind="base") == 11
    for i in range(1, 4):
        m.generated("base")
        assert value(m, "loraplex_generation_tokens_total", adapter_kind="base") == i
    m.finished("base", "length", 0.1, 0.01, None)
    assert value(m, "loraplex_prompt_tokens_total", adapter_kind="base") == 11
    assert value(m, "loraplex_generation_tokens_total", adapter_kind="base") == 3


def _telemetry(m: Metrics):
    from server.engine.block_manager import BlockManager
    from server.engine.scheduler import Scheduler, SchedulerConfig
    from server.engine.telemetry import Telemetry

    return Telemetry(m, Scheduler(SchedulerConfig(), BlockManager(4, 16), residency(2)))


def test_a_request_that_never_ran_observes_its_whole_life_as_queue_time():
    from server.engine.request import FinishReason, Request, SamplingParams

    m = Metrics()
    t = _telemetry(m)
    req = Request("never-ran", [1, 2, 3], SamplingParams(max_tokens=4), arrival=time.monotonic() - 2.0)
    t.finished(req, FinishReason.ABORT)
    assert value(m, "loraplex_request_queue_time_seconds_count", adapter_kind="base") == 1
    assert 2.0 <= value(m, "loraplex_request_queue_time_seconds_sum", adapter_kind="base") < 10
    assert value(m, "loraplex_requests_total", adapter_kind="base", outcome="abort") == 1
    assert value(m, "loraplex_e2e_request_latency_seconds_count", adapter_kind="base") == 0
    assert value(m, "loraplex_prompt_tokens_total", adapter_kind="base") == 0  # its prompt was never processed
    # One that was admitted observed its queue time then, and not a second time at its end.
    ran = Request("ran", [1, 2, 3], SamplingParams(max_tokens=4))
    ran.admitted_at = time.monotonic()
    m.admitted("base", 0.0)
    t.finished(ran, FinishReason.LENGTH)
    assert value(m, "loraplex_request_queue_time_seconds_count", adapter_kind="base") == 2
    assert value(m, "loraplex_e2e_request_latency_seconds_count", adapter_kind="base") == 1


def test_telemetry_faults_are_logged_and_never_raised(caplog):
    from server.engine.request import FinishReason, Request, SamplingParams

    m = Metrics()
    t = _telemetry(m)
    t.scheduler = None  # the gauges cannot be read: the fault must stay inside the telemetry
    t.state()
    req = Request("r", [1], SamplingParams(max_tokens=1))
    t.metrics = None
    t.finished(req, FinishReason.STOP)
    assert sum("metrics:" in r.getMessage() for r in caplog.records) == 2


# -- slot waits and device-tier load failures -----------------------------------------------------------------


def test_slot_waits_count_each_time_a_host_resident_adapter_finds_no_free_slot():
    m = Metrics()
    cache = _cache(m, slots=1, host_bytes=1 << 20)
    try:
        busy = Counter({_ready(cache, "a"): 1})  # the only slot, busy with a running request
        assert value(m, "loraplex_adapter_slot_waits_total") == 0
        assert _ready(cache, "b", busy) == -1  # b loads from disk (no wait counted for it), then finds no free slot
        assert value(m, "loraplex_adapter_slot_waits_total") == 1
        stored_b = StoredAdapter("b", "v1", Path("/store/b"))
        for i in range(2, 5):  # once per engine step it waits
            assert cache.acquire(stored_b, busy).outcome is Outcome.NO_SLOT
            assert value(m, "loraplex_adapter_slot_waits_total") == i
        assert cache.acquire(stored_b, busy, new_slot=False).outcome is Outcome.NO_SLOT  # an older request goes first
        assert value(m, "loraplex_adapter_slot_waits_total") == 5
        # Still loading from disk is not a slot wait.
        stored_c = StoredAdapter("c", "v1", Path("/store/c"))
        cache.loader.blocked.add("c")
        assert cache.acquire(stored_c, busy).outcome is Outcome.LOADING
        assert value(m, "loraplex_adapter_slot_waits_total") == 5
        got = cache.acquire(stored_b, Counter())  # the request finished: b takes the slot, no wait
        assert got.outcome is Outcome.READY
        assert value(m, "loraplex_adapter_slot_waits_total") == 5
    finally:
        cache.close()


def test_a_failed_slot_write_counts_a_failed_device_load_and_leaves_the_slot_usable():
    m = Metrics()
    cache = _cache(m, slots=1, host_bytes=1 << 20)
    try:
        real_write = cache.slots.write
        calls = []

        def broken_write(slot, weights):
            calls.append(slot)
            if len(calls) == 1:
                raise RuntimeError("device write failed on purpose")
            real_write(slot, weights)

        cache.slots.write = broken_write
        stored = StoredAdapter("a", "v1", Path("/store/a"))
        with pytest.raises(RuntimeError, match="on purpose"):
            _ready(cache, "a")
        assert value(m, "loraplex_adapter_loads_total", tier="device", result="failed") == 1
        assert value(m, "loraplex_adapter_loads_total", tier="device", result="ok") == 0
        assert value(m, "loraplex_adapter_load_seconds_count", tier="device") == 0  # failures are not timed
        got = cache.acquire(stored, Counter())  # the slot stayed free: the next try takes it
        assert got.outcome is Outcome.READY
        assert value(m, "loraplex_adapter_loads_total", tier="device", result="ok") == 1
        assert value(m, "loraplex_adapter_loads_total", tier="device", result="failed") == 1
    finally:
        cache.close()
