"""``GET /metrics`` on a tiny model in-process: what it counts must be exactly what was sent.

Base, single-adapter and composed requests, one aborted by its timeout, one
refused with 429, one failed by a broken adapter; then the exposition parsed
with prometheus_client's own parser and held against the responses: request
counts by kind and outcome, token counters against ``usage``, histogram counts,
adapter-cache lookups and loads, evictions by reason, gauges at rest, the
bounded adapter label and the vLLM subset. Counts are compared as differences
between two scrapes, and each test uses adapters of its own, so the tests of
this module do not depend on one another's counts.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.adapters.selection import Selection
from server.api.app import create_app
from server.config import AuthConfig, LimitsConfig
from server.engine.request import Request, SamplingParams
from server.lora import cpu_kernel
from server.metrics import MetricsConfig
from server.model import cpu_attention
from tests.helpers import engine as eng
from tests.helpers.tiny import AdapterSpec, edit_adapter, make_adapter, make_model, make_tokenizer
from tests.helpers.tiny_server import CHAT_TEMPLATE

KEY = "sk-metrics-test-0001"
AUTH = {"authorization": f"Bearer {KEY}"}
MAX_LORAS = 4
HOST_CACHE = 64 << 20
PROMPT = "the quick brown fox"
OTHER_PROMPT = "a multi adapter lora server"
KINDS = ("base", "adapter", "composed")
ADAPTERS = ("a1", "a2", "a3", "e1", "e2", "k1", "k2", "k3", "k4", "v1")


class Gate:
    """Wraps ``runner.execute``: a step waits while the gate is shut, and sleeps ``delay`` first."""

    def __init__(self, runner) -> None:
        self.inner = runner.execute
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()  # a step is (or was) inside execute
        self.delay = 0.0
        runner.execute = self

    def __call__(self, seqs):
        self.entered.set()
        self.open.wait(30)
        if self.delay:
            time.sleep(self.delay)
        return self.inner(seqs)


@dataclass
class World:
    client: TestClient
    tok: object
    gate: Gate

    @property
    def state(self):
        return self.client.app.state.loraplex

    @property
    def serving(self):
        return self.state.serving

    def settle(self) -> None:
        """Wait until the engine thread has done everything asked of it so far and then run one more step
        (which refreshes the gauges): two calls on the engine thread, one step apart."""
        for _ in range(2):
            self.serving.engine.call(lambda: None).result(timeout=30)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # The C kernels from the shared cache: a fresh server cache dir would rebuild them.
    cpu_kernel.available()
    cpu_attention.available()
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    base = make_model("llama", len(tok), seed=5)
    store = tmp_path_factory.mktemp("metrics-store")
    for i, name in enumerate(ADAPTERS):
        make_adapter(base, AdapterSpec(name, 4, 8, ("q_proj", "v_proj")), store, seed=10 + i)
    # The start-up check of the store finds their NaN: requests naming them are refused at lookup, and
    # /v1/models lists them as invalid. nan-probe goes to the engine directly, whose loader refuses it.
    for name in ("nan", "nan-probe"):
        edit_adapter(make_adapter(base, AdapterSpec(name, 4, 8, ("q_proj", "v_proj")), store, seed=99), poison)
    return base, tok, store, tmp_path_factory.mktemp("metrics-cache")


def poison(tensors: dict) -> None:
    key = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")


@pytest.fixture(scope="module")
def world(tiny):
    """Metrics with a top-2 adapter label and the vLLM subset; one running request, no queue; an API key."""
    base, tok, store, cache = tiny
    metrics = MetricsConfig(adapter_top_k=2, vllm_compatible=True)
    app = create_app(lambda: eng.build(
        base, tok, store, cache, kv_tokens=2048, max_loras=MAX_LORAS, max_num_seqs=1, host_cache_bytes=HOST_CACHE,
        limits=LimitsConfig(max_queued_requests=0), auth=AuthConfig(api_keys={KEY: ()}), metrics=metrics,
    ))
    with TestClient(app) as client:
        gate = Gate(client.app.state.loraplex.serving.engine.runner)
        yield World(client, tok, gate)
        gate.open.set()


# -- scraping ---------------------------------------------------------------------------------------------


@dataclass
class Scrape:
    text: str
    types: dict[str, str] = field(default_factory=dict)
    samples: dict[tuple[str, tuple], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for fam in text_string_to_metric_families(self.text):
            self.types[fam.name] = fam.type
            for s in fam.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def series(self, name: str) -> list[dict[str, str]]:
        return [dict(labels) for (n, labels) in self.samples if n == name]

    def label_values(self, name: str, label: str) -> set[str]:
        return {s[label] for s in self.series(name) if label in s}


def scrape(w: World) -> Scrape:
    r = w.client.get("/metrics")  # no API key: Prometheus scrapes without one
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return Scrape(r.text)


def delta(after: Scrape, before: Scrape, name: str, **labels: str) -> float:
    return after.get(name, **labels) - before.get(name, **labels)


# -- what was sent --------------------------------------------------------------------------------------------


@dataclass
class Sent:
    """Per adapter kind: outcomes, tokens, and how many requests produced tokens."""

    outcomes: Counter = field(default_factory=Counter)  # (kind, outcome)
    prompt: Counter = field(default_factory=Counter)
    generated: Counter = field(default_factory=Counter)
    with_tokens: Counter = field(default_factory=Counter)  # requests with a first token
    ended: Counter = field(default_factory=Counter)  # requests the engine finished (all but the rejected)
    itl: Counter = field(default_factory=Counter)  # inter-token gaps
    multi_token: Counter = field(default_factory=Counter)  # requests with two or more tokens (TPOT)

    def completed(self, kind: str, body: dict) -> None:
        (choice,) = body["choices"]
        usage = body["usage"]
        n = usage["completion_tokens"]
        self.outcomes[kind, choice["finish_reason"]] += 1
        self.prompt[kind] += usage["prompt_tokens"]
        self.generated[kind] += n
        self.ended[kind] += 1
        self.with_tokens[kind] += n > 0
        self.itl[kind] += max(n - 1, 0)
        self.multi_token[kind] += n > 1


def complete(w: World, sent: Sent, kind: str, **body) -> dict:
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, **body}
    r = w.client.post("/v1/completions", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    sent.completed(kind, r.json())
    return r.json()


def composed(*names: str) -> list[dict]:
    return [{"name": n, "weight": 0.5} for n in names]


def test_counters_and_histograms_match_what_was_sent(world):
    w = world
    w.settle()
    before = scrape(w)
    sent = Sent()

    # Base: plain, ignore_eos, a chat request, and one ended by a stop string taken from a base answer.
    text = complete(w, sent, "base", model="tiny", ignore_eos=True)["choices"][0]["text"]
    complete(w, sent, "base", model="", prompt=OTHER_PROMPT, max_tokens=3, ignore_eos=True)
    stop = text.strip()[2:5]
    assert stop, f"the base answer is too short to take a stop string from: {text!r}"
    stopped = complete(w, sent, "base", model="tiny", max_tokens=12, stop=[stop])
    assert stopped["choices"][0]["finish_reason"] == "stop", stopped
    chat = w.client.post("/v1/chat/completions", headers=AUTH, json={
        "model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "temperature": 0})
    assert chat.status_code == 200, chat.text
    sent.completed("base", {"choices": chat.json()["choices"], "usage": chat.json()["usage"]})

    # One adapter: a1 from disk, then from its device slot; a2 from disk.
    first = w.client.post("/v1/completions", headers=AUTH,
                          json={"model": "a1", "prompt": PROMPT, "max_tokens": 5, "temperature": 0})
    assert first.headers["x-loraplex-adapter-cache"] == "disk"
    sent.completed("adapter", first.json())
    complete(w, sent, "adapter", model="a1", max_tokens=7, ignore_eos=True)
    complete(w, sent, "adapter", model="a2", prompt=OTHER_PROMPT, ignore_eos=True)

    # Composed: a1 (on a slot) with a3 (on disk), then a2 with a3 (both on slots).
    complete(w, sent, "composed", model="", adapters=composed("a1", "a3"), ignore_eos=True)
    complete(w, sent, "composed", model="", adapters=composed("a2", "a3"), max_tokens=4)

    # Aborted by its timeout: the engine is held inside its first step, so the request has exactly one token
    # (its prefill's) when the abort is taken, after the gate opens.
    w.settle()
    prompt_of = {}
    for p in (PROMPT, OTHER_PROMPT):  # prompt lengths as the server counts them, from a 1-token base request
        prompt_of[p] = complete(w, sent, "base", model="tiny", prompt=p, max_tokens=1)["usage"]["prompt_tokens"]
    w.settle()
    w.gate.entered.clear()
    w.gate.open.clear()
    timed_out: dict = {}

    def post_with_timeout() -> None:
        timed_out["r"] = w.client.post("/v1/completions", headers=AUTH, json={
            "model": "tiny", "prompt": PROMPT, "max_tokens": 50, "ignore_eos": True, "timeout": 1.0})

    thread = threading.Thread(target=post_with_timeout)
    thread.start()
    try:
        assert w.gate.entered.wait(10), "the request never reached the model"
        thread.join(30)
        assert timed_out["r"].status_code == 504, timed_out["r"].text
    finally:
        w.gate.open.set()
    w.settle()
    sent.outcomes["base", "abort"] += 1
    sent.prompt["base"] += prompt_of[PROMPT]
    sent.generated["base"] += 1
    sent.with_tokens["base"] += 1
    sent.ended["base"] += 1

    # Rejected: one request running (held in the engine), no queue: the next one is 429 without reaching it.
    w.gate.entered.clear()
    w.gate.open.clear()
    running: dict = {}

    def post_running() -> None:
        running["r"] = w.client.post("/v1/completions", headers=AUTH, json={
            "model": "a1", "prompt": PROMPT, "max_tokens": 3, "ignore_eos": True, "temperature": 0})

    thread = threading.Thread(target=post_running)
    thread.start()
    try:
        assert w.gate.entered.wait(10), "the running request never reached the model"
        refused = w.client.post("/v1/completions", headers=AUTH, json={"model": "a2", "prompt": PROMPT})
        assert refused.status_code == 429, refused.text
        refused_composed = w.client.post("/v1/completions", headers=AUTH,
                                         json={"model": "", "prompt": PROMPT, "adapters": composed("a1", "a2")})
        assert refused_composed.status_code == 429, refused_composed.text
    finally:
        w.gate.open.set()
    thread.join(30)
    assert running["r"].status_code == 200, running["r"].text
    sent.completed("adapter", running["r"].json())
    sent.outcomes["adapter", "rejected"] += 1
    sent.outcomes["composed", "rejected"] += 1

    # Failed: the adapter's weights hold a NaN, which the loader refuses. It never ran: no prompt tokens (they
    # count when the prompt is processed), no latency but its queue time (its whole life). Placed after
    # start-up (so the start-up check did not see it), it passes the lookup.
    store = w.serving.store.root
    if not (store / "nan-late").exists():
        edit_adapter(shutil.copytree(store / "a1", store / "nan-late"), tensors=poison)
    broken = w.client.post("/v1/completions", headers=AUTH, json={"model": "nan-late", "prompt": OTHER_PROMPT})
    assert broken.status_code == 400 and "cannot be loaded" in broken.json()["error"]["message"], broken.text
    sent.outcomes["adapter", "error"] += 1
    sent.ended["adapter"] += 1

    w.settle()
    after = scrape(w)

    for kind in KINDS:
        completed = sent.outcomes[kind, "stop"] + sent.outcomes[kind, "length"]
        for outcome in ("stop", "length", "abort", "error", "rejected"):
            got = delta(after, before, "loraplex_requests_total", adapter_kind=kind, outcome=outcome)
            assert got == sent.outcomes[kind, outcome], (kind, outcome)
        assert delta(after, before, "loraplex_prompt_tokens_total", adapter_kind=kind) == sent.prompt[kind], kind
        assert delta(after, before, "loraplex_generation_tokens_total", adapter_kind=kind) == sent.generated[kind]
        hist = {
            "loraplex_time_to_first_token_seconds": sent.with_tokens[kind],
            "loraplex_request_prefill_time_seconds": sent.with_tokens[kind],
            "loraplex_e2e_request_latency_seconds": completed,  # not the aborted nor the failed
            "loraplex_request_queue_time_seconds": sent.ended[kind],  # at admission, or at the end if never run
            "loraplex_inter_token_latency_seconds": sent.itl[kind],
            "loraplex_time_per_output_token_seconds": sent.multi_token[kind],
        }
        for name, expected in hist.items():
            assert delta(after, before, name + "_count", adapter_kind=kind) == expected, (name, kind)
            assert delta(after, before, name + "_bucket", adapter_kind=kind, le="+Inf") == expected, (name, kind)
    assert sent.outcomes["base", "stop"] >= 1 and sent.outcomes["adapter", "length"] >= 1

    # Adapter cache: lookups at arrival; a1, a2, a3 and nan first found on disk, every later use on a slot.
    # Arrivals: a1 x4 (disk once), a2 x1 (disk), a1+a3 (a3 disk), a2+a3 (both slots), nan (disk).
    disk_first = 4  # a1, a2, a3, nan
    arrivals = 4 + 2 + 2 + 1  # a1 (alone x2, composed, the one running at the 429), a2 x2, a3 x2, nan
    expected_lookups = {"device": arrivals, "host": disk_first, "disk": disk_first}
    expected_hits = {"device": arrivals - disk_first, "host": 0, "disk": disk_first}
    for tier in ("device", "host", "disk"):
        assert delta(after, before, "loraplex_adapter_cache_lookups_total", tier=tier) == expected_lookups[tier], tier
        assert delta(after, before, "loraplex_adapter_cache_hits_total", tier=tier) == expected_hits[tier], tier
    assert delta(after, before, "loraplex_adapter_loads_total", tier="host", result="ok") == 3  # a1, a2, a3
    assert delta(after, before, "loraplex_adapter_loads_total", tier="host", result="failed") == 1  # nan
    assert delta(after, before, "loraplex_adapter_loads_total", tier="device", result="ok") == 3
    assert delta(after, before, "loraplex_adapter_load_seconds_count", tier="host") == 3

    # Engine steps: one batch-size observation per step with work, and every phase timed in each.
    # One request runs at a time and every prompt fits one step: a step per generated token.
    steps = delta(after, before, "loraplex_batch_size_sequences_count")
    assert steps == sum(sent.generated.values())
    assert delta(after, before, "loraplex_batch_size_sequences_sum") == steps
    for phase in ("schedule", "forward", "sample", "emit"):
        assert delta(after, before, "loraplex_engine_step_seconds_count", phase=phase) == steps, phase
    assert delta(after, before, "loraplex_batch_distinct_adapters_count") == steps
    # Tokens through the model: each admitted request's prompt, then one per token after its first.
    forwarded = sum(sent.prompt.values()) + sum(sent.generated.values()) - sum(sent.with_tokens.values())
    assert delta(after, before, "loraplex_batch_size_tokens_sum") == forwarded


def test_evictions_are_counted_by_tier_and_reason(world):
    w = world
    for name in ("e1", "e2"):
        r = w.client.post("/v1/completions", headers=AUTH, json={"model": name, "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 200, r.text
    w.settle()
    assert w.client.get("/admin/adapters/e1").json()["tier"] == "device"  # just used, so not the LRU slot
    before = scrape(w)
    assert w.client.post("/admin/adapters/e1/evict").status_code == 200
    mid = scrape(w)
    assert delta(mid, before, "loraplex_adapter_evictions_total", tier="device", reason="admin") == 1
    assert delta(mid, before, "loraplex_adapter_evictions_total", tier="host", reason="admin") == 1
    assert mid.get("loraplex_adapter_host_cache_bytes") < before.get("loraplex_adapter_host_cache_bytes")
    stored = before.get("loraplex_adapters_stored")
    assert w.client.delete("/admin/adapters/e2").status_code == 200
    after = scrape(w)
    assert delta(after, mid, "loraplex_adapter_evictions_total", tier="device", reason="delete") == 1
    assert delta(after, mid, "loraplex_adapter_evictions_total", tier="host", reason="delete") == 1
    assert delta(after, mid, "loraplex_adapter_evictions_total", tier="device", reason="admin") == 0
    for tier in ("device", "host"):
        assert delta(after, before, "loraplex_adapter_evictions_total", tier=tier, reason="lru") == 0
    assert after.get("loraplex_adapters_stored") == stored - 1


def test_gauges_at_rest(world):
    w = world
    w.settle()
    s = scrape(w)
    assert s.get("loraplex_adapter_slots_capacity") == MAX_LORAS
    assert s.get("loraplex_adapter_host_cache_limit_bytes") == HOST_CACHE
    for idle in ("loraplex_requests_running", "loraplex_requests_waiting", "loraplex_adapters_waiting_for_slot",
                 "loraplex_adapter_slots_used", "loraplex_kv_cache_usage_ratio"):
        assert s.get(idle) == 0, idle
    listing = w.client.get("/admin/adapters").json()
    assert s.get("loraplex_adapter_host_cache_bytes") == listing["host_bytes"]
    assert s.get("loraplex_adapters_stored") == len(w.serving.store.names()) == len(listing["data"])
    assert w.state.registry.report.done.wait(30)  # the start-up check of the store
    models = w.client.get("/v1/models", headers=AUTH).json()["data"]
    # The base model first, then every adapter, nan and nan-probe marked invalid by that check.
    assert s.get("loraplex_adapters_stored") == len(models) - 1
    assert {m["id"] for m in models if m.get("status") == "invalid"} == {"nan", "nan-probe"}


def test_gauges_while_a_request_runs_then_at_rest_again(world):
    """Running, slots, KV and vLLM's gauges show a running adapter request, and return to zero after it."""
    w = world
    w.gate.delay = 0.03  # ~3 s for 100 tokens: longer than lora_requests_info's one-second refresh
    done: dict = {}

    def post() -> None:
        done["r"] = w.client.post("/v1/completions", headers=AUTH, json={
            "model": "v1", "prompt": PROMPT, "max_tokens": 100, "ignore_eos": True})

    thread = threading.Thread(target=post)
    try:
        thread.start()
        deadline = time.monotonic() + 20
        while True:
            s = scrape(w)
            info = s.series("vllm:lora_requests_info")
            if s.get("loraplex_requests_running") == 1 and info and info[0]["running_lora_adapters"] == "v1":
                break
            assert time.monotonic() < deadline, (s.get("loraplex_requests_running"), info)
            time.sleep(0.05)
        assert s.get("vllm:num_requests_running", model_name="tiny") == 1
        assert s.get("vllm:num_requests_waiting", model_name="tiny") == 0
        assert s.get("loraplex_adapter_slots_used") >= 1
        assert 0 < s.get("loraplex_kv_cache_usage_ratio") <= 1
        assert s.get("vllm:kv_cache_usage_perc", model_name="tiny") == s.get("loraplex_kv_cache_usage_ratio")
        assert len(info) == 1 and info[0]["max_lora"] == str(MAX_LORAS) and info[0]["waiting_lora_adapters"] == ""
    finally:
        w.gate.delay = 0.0
        thread.join(60)
    assert done["r"].status_code == 200, done["r"].text
    deadline = time.monotonic() + 10
    while True:
        w.settle()
        s = scrape(w)
        info = s.series("vllm:lora_requests_info")
        if info and info[0]["running_lora_adapters"] == "":
            break
        assert time.monotonic() < deadline, info
        time.sleep(0.1)
    assert len(info) == 1
    (value,) = [v for (n, _), v in s.samples.items() if n == "vllm:lora_requests_info"]
    assert abs(value - time.time()) < 5
    for idle in ("loraplex_requests_running", "loraplex_requests_waiting", "loraplex_adapter_slots_used",
                 "loraplex_kv_cache_usage_ratio"):
        assert s.get(idle) == 0, idle
    assert s.get("vllm:num_requests_running", model_name="tiny") == 0
    assert s.get("vllm:num_requests_waiting", model_name="tiny") == 0
    assert s.get("vllm:kv_cache_usage_perc", model_name="tiny") == 0


def test_the_adapter_label_stays_within_the_top_k(world):
    """--metrics-top-k 2: whatever adapters are used, at most two names plus ``other``."""
    w = world
    before = scrape(w)
    for name in ("k1", "k2", "k3", "k4", "k1", "k3"):
        r = w.client.post("/v1/completions", headers=AUTH, json={"model": name, "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 200, r.text
    w.settle()
    after = scrape(w)
    for name in ("loraplex_adapter_requests_total", "loraplex_adapter_time_to_first_token_seconds_count",
                 "loraplex_adapter_e2e_request_latency_seconds_count"):
        values = after.label_values(name, "adapter")
        assert len(values) <= 3 and "other" in values, (name, values)
    folded = delta(after, before, "loraplex_adapter_label_folded_total")
    by_label = sum(delta(after, before, "loraplex_adapter_requests_total", adapter=a, outcome="length")
                   for a in after.label_values("loraplex_adapter_requests_total", "adapter"))
    assert by_label == 6
    assert folded == delta(after, before, "loraplex_adapter_requests_total", adapter="other", outcome="length") >= 2


def test_metrics_need_no_api_key_but_inference_does(world):
    w = world
    assert w.client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1}).status_code == 401
    r = w.client.get("/metrics")
    assert r.status_code == 200
    s = Scrape(r.text)
    assert all(n.startswith(("loraplex_", "vllm:")) for n in s.types), sorted(s.types)
    assert {
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:lora_requests_info"
    } <= set(s.types)


def test_a_request_that_could_never_be_admitted_is_not_counted_as_rejected(world):
    """More prompts than the server ever admits at once is the caller's error (400, retrying cannot help):
    ``rejected`` is for capacity refusals (429, 503), which the high-rejection-rate alert watches."""
    w = world
    w.settle()
    before = scrape(w)
    r = w.client.post("/v1/completions", headers=AUTH, json={"model": "a1", "prompt": [PROMPT, PROMPT]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_prompts", r.text
    after = scrape(w)
    for kind in KINDS:
        assert delta(after, before, "loraplex_requests_total", adapter_kind=kind, outcome="rejected") == 0, kind


@dataclass
class Probe:
    """An engine output sink that reads the request counter when the final output reaches it."""

    serving: object
    kind: str
    outcome: str
    seen_at_finish: float | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def count(self) -> float:
        return self.serving.metrics.registry.get_sample_value(
            "loraplex_requests_total", {"adapter_kind": self.kind, "outcome": self.outcome})

    def __call__(self, out) -> None:
        if out.finished:
            self.seen_at_finish = self.count()
            self.done.set()


@pytest.mark.parametrize("case", ["length", "refused-at-admission", "adapter-failed"])
def test_a_request_is_counted_before_its_final_output_is_delivered(world, case):
    """The final output is what ends the HTTP response; a scrape right after it must see the request counted,
    whichever way the request ended."""
    w = world
    serving = w.serving
    w.settle()
    if case == "length":
        req = Request("probe-length", [5, 6, 7], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        probe = Probe(serving, "base", "length")
    elif case == "refused-at-admission":  # prompt + max_tokens past the context: the scheduler refuses it
        req = Request("probe-too-long", [5, 6, 7], SamplingParams(max_tokens=100_000, temperature=0.0))
        probe = Probe(serving, "base", "error")
    else:
        req = Request("probe-nan", [5, 6, 7], SamplingParams(max_tokens=2),
                      selection=Selection.of(serving.store.get("nan-probe")))
        probe = Probe(serving, "adapter", "error")
    before = probe.count()
    serving.engine.submit(req, probe)
    assert probe.done.wait(30)
    w.settle()
    assert probe.count() == before + 1
    assert probe.seen_at_finish == before + 1, f"{case}: counted only after its final output was delivered"


# -- metrics off ----------------------------------------------------------------------------------------------


def test_metrics_disabled_is_404_and_requests_still_work(tiny):
    base, tok, store, cache = tiny
    app = create_app(lambda: eng.build(base, tok, store, cache, kv_tokens=2048, max_loras=2,
                                       metrics=MetricsConfig(enabled=False)))
    with TestClient(app) as client:
        assert client.app.state.loraplex.serving.metrics is None
        assert client.get("/metrics").status_code == 404
        for body in ({"model": "tiny"}, {"model": "a1"}, {"model": "", "adapters": composed("a1", "a2")}):
            r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "ignore_eos": True, **body})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 3
        broken = client.post("/v1/completions", json={"model": "nan", "prompt": PROMPT})
        assert broken.status_code == 400, broken.text
        assert client.get("/metrics").json()["error"]["code"] == "metrics_disabled"



# -- a default install ----------------------------------------------------------------------------------------


def test_a_default_install_has_the_per_adapter_series_the_dashboards_read(tiny):
    """No metrics options: the ``adapter`` label is on (top 10), so Grafana's per-adapter panels have data."""
    base, tok, store, cache = tiny
    app = create_app(lambda: eng.build(base, tok, store, cache, kv_tokens=2048, max_loras=2))
    with TestClient(app) as client:
        assert client.app.state.loraplex.serving.metrics.config == MetricsConfig()
        for name in ("a1", "a2", "a1", "tiny"):
            r = client.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 2,
                                                     "ignore_eos": True})
            assert r.status_code == 200, r.text
        World(client, tok, None).settle()
        s = Scrape(client.get("/metrics").text)
    assert s.get("loraplex_adapter_requests_total", adapter="a1", outcome="length") == 2
    assert s.get("loraplex_adapter_requests_total", adapter="a2", outcome="length") == 1
    assert s.get("loraplex_adapter_time_to_first_token_seconds_count", adapter="a1") == 2
    assert s.get("loraplex_adapter_e2e_request_latency_seconds_count", adapter="a2") == 1
    assert s.label_values("loraplex_adapter_requests_total", "adapter") == {"a1", "a2"}  # the base is no adapter
    assert s.samples[("loraplex_adapter_label_folded_total", ())] == 0  # exported, nothing folded
