"""Adapter composition over HTTP on a tiny model, against transformers run on merged weights.

A request with ``adapters: [{"name", "weight"}, ...]`` must answer as the base
model whose targeted weights are ``W + sum_i w_i * scale_i * B_i A_i``. The
reference merges PEFT's own ``get_delta_weight`` (its scaling: alpha/r, rsLoRA,
rank_pattern, alpha_pattern) into a copy of the transformers model; nothing of
the server is used to build it.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest
import torch
from fastapi.testclient import TestClient

from server.adapters.commands import TakeSnapshot
from server.api.app import create_app
from server.lora import cpu_kernel
from server.lora.metadata import LoraBackend
from server.model import cpu_attention
from server.model.runner import SeqStep
from tests.helpers import engine as eng
from tests.helpers.reference import greedy, peft_deltas
from tests.helpers.tiny import MIXED_ADAPTERS, AdapterSpec, edit_adapter, make_adapter, make_model, make_tokenizer
from tests.helpers.tiny_server import CHAT_TEMPLATE

MAX_NEW = 10
SHORT = "the quick brown fox"
LONG = "a multi adapter lora server batches many adapters into one forward pass, hello world"  # 39 tokens
ALPHA_PATTERN = AdapterSpec("alpha-pattern", 4, 8, ("k_proj", "up_proj", "down_proj"))
ALPHAS = {"down_proj": 24}  # written into its adapter_config.json after saving
Composition = tuple[tuple[str, float], ...]
# Adapters of different ranks and targets: all-r8 (every projection), attn-r4, mlp-r16, rslora-r12 (rsLoRA),
# r1, r3-pattern (rank_pattern o_proj: 6), alpha-pattern (alpha_pattern down_proj: 24).
TWO: Composition = (("all-r8", 0.6), ("rslora-r12", 0.8))
THREE: Composition = (("attn-r4", 1.0), ("mlp-r16", -0.7), ("r3-pattern", 1.5))
THREE_B: Composition = (("alpha-pattern", -1.2), ("r1", 2.0), ("all-r8", 0.4))
HALF: Composition = (("rslora-r12", 0.5),)
COMPOSITIONS = [TWO, THREE, THREE_B, HALF]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tokenizer, base model, adapters on disk, and a cache of merged-weight references."""
    # Load the C kernels from the shared cache now: a fresh server cache dir would rebuild them (~20 s each).
    cpu_kernel.available()
    cpu_attention.available()
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    base = make_model("llama", len(tok), seed=3)
    store = tmp_path_factory.mktemp("store")
    specs = (*MIXED_ADAPTERS, ALPHA_PATTERN)
    paths = {s.name: make_adapter(base, s, store, seed=40 + i) for i, s in enumerate(specs)}
    edit_adapter(paths[ALPHA_PATTERN.name], config=lambda c: c.update(alpha_pattern=ALPHAS))
    # A broken one: a shape that does not fit (refused at lookup). One with NaN values is placed by the test
    # that needs it, after start-up, so that only the loader finds it (the start-up check would refuse it).
    edit_adapter(shutil.copytree(paths["attn-r4"], store / "bad-shape"), tensors=_truncate_an_a)
    deltas = {}
    for spec in specs:
        deltas[spec.name], scalings = peft_deltas(base, paths[spec.name])
        for module, scaling in scalings.items():  # PEFT read the config we meant: rsLoRA, rank and alpha patterns
            proj = module.rsplit(".", 1)[-1]
            r = (spec.rank_pattern or {}).get(proj, spec.r)
            alpha = ALPHAS.get(proj, spec.alpha) if spec is ALPHA_PATTERN else spec.alpha
            assert scaling == pytest.approx(alpha / math.sqrt(r) if spec.rslora else alpha / r), module
    return References(tok, base, store, deltas)


def _truncate_an_a(tensors: dict) -> None:
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[key] = tensors[key][:, :10].contiguous()


def _poison(tensors: dict) -> None:
    key = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")


class References:
    """Merged-weight transformers models, one per composition, and their greedy continuations."""

    def __init__(self, tok, base, store, deltas) -> None:
        self.tok, self.base, self.store, self.deltas = tok, base, store, deltas
        self._models: dict[Composition, torch.nn.Module] = {}
        self._greedy: dict[tuple[Composition, tuple[int, ...]], list[int]] = {}

    def model(self, composition: Composition):
        if composition not in self._models:
            merged = copy.deepcopy(self.base)
            with torch.no_grad():
                for name, weight in composition:
                    for module, delta in self.deltas[name].items():
                        merged.get_submodule(module).weight += weight * delta
            self._models[composition] = merged.eval()
        return self._models[composition]

    def greedy(self, composition: Composition, prompt_ids: Sequence[int]) -> list[int]:
        key = (composition, tuple(prompt_ids))
        if key not in self._greedy:
            self._greedy[key] = greedy(self.model(composition), list(prompt_ids), MAX_NEW, eos_token_id=0)
        return self._greedy[key]

    def text(self, composition: Composition, prompt_ids: Sequence[int]) -> str:
        return self.tok.decode(self.greedy(composition, prompt_ids), skip_special_tokens=True)

    def ids(self, prompt: str) -> list[int]:
        return self.tok(prompt)["input_ids"]


def serve(models: References, cache, **build) -> TestClient:
    app = create_app(lambda: eng.build(models.base, models.tok, models.store, cache, kv_tokens=2048, **build))
    return TestClient(app)


@pytest.fixture(scope="module", params=["auto", "torch", "reference"])
def world(request, models, tmp_path_factory):
    """A server per LoRA backend, every adapter already on a device slot (8 slots, 7 adapters)."""
    with serve(models, tmp_path_factory.mktemp("cache"), backend=request.param) as client:
        backend = client.app.state.loraplex.serving.engine.runner.backend
        if request.param == "auto":
            assert backend is (LoraBackend.CPU_KERNEL if cpu_kernel.available() else LoraBackend.TORCH)
        else:
            assert backend is LoraBackend(request.param)
        for name in models.deltas:
            assert client.post(f"/admin/adapters/{name}/load").status_code == 200
        yield client, models
        assert_released(client)


@pytest.fixture(scope="module")
def small(models, tmp_path_factory):
    """A server with two adapter slots (``--max-loras 2``), nothing loaded yet."""
    with serve(models, tmp_path_factory.mktemp("cache-small"), max_loras=2) as client:
        yield client, models
        assert_released(client)


def adapters(composition: Composition) -> list[dict]:
    return [{"name": name, "weight": weight} for name, weight in composition]


def complete(client: TestClient, composition: Composition | None, prompt, model: str = "", **body):
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0, **body}
    if composition is not None:
        body["adapters"] = adapters(composition)
    return client.post("/v1/completions", json=body)


def assert_matches(r, models: References, composition: Composition, prompt_ids: list[int]) -> None:
    assert r.status_code == 200, r.text
    body = r.json()
    expected = models.greedy(composition, prompt_ids)
    assert body["choices"][0]["text"] == models.tok.decode(expected, skip_special_tokens=True), composition
    assert body["usage"]["completion_tokens"] == len(expected)


def assert_released(client: TestClient, timeout: float = 5.0) -> None:
    """The engine is idle, no adapter slot or KV block is held, no adapter lease is out."""
    state = client.app.state.loraplex
    engine = state.serving.engine
    sched = engine.scheduler

    def snapshot():
        return sched.has_work, sched.residency.slots_in_use(sched.busy_slots()), sched.blocks.used_blocks

    deadline = time.monotonic() + timeout
    while True:
        idle = engine.call(snapshot).result(timeout) == (False, 0, 0)
        leases = engine.send(TakeSnapshot()).result(timeout).held_versions()
        if idle and not leases:
            return
        assert time.monotonic() < deadline, (engine.call(snapshot).result(timeout), leases)
        time.sleep(0.02)


@contextmanager
def paused(engine) -> Iterator[None]:
    """Hold the engine thread between two steps; messages sent meanwhile are all taken before the next step.
    Requests submitted meanwhile are counted (:func:`wait_for_inbox`)."""
    holding, gate = threading.Event(), threading.Event()
    submitted = SUBMITTED[engine] = [0]

    def hold() -> bool:
        holding.set()
        return gate.wait(30)

    def counted(request, sink) -> None:
        type(engine).submit(engine, request, sink)
        submitted[0] += 1

    done = engine.call(hold)
    engine.submit = counted
    try:
        assert holding.wait(30), "the engine did not pause"
        yield
    finally:
        del engine.submit
        gate.set()
    assert done.result(30)


SUBMITTED: dict[object, list[int]] = {}  # requests submitted to a paused engine


def wait_for_inbox(engine, n: int) -> None:
    """Until ``n`` requests were submitted since the engine paused (each also sends adapter holds)."""
    deadline = time.monotonic() + 30
    while SUBMITTED[engine][0] < n:
        assert time.monotonic() < deadline, "requests did not reach the engine"
        time.sleep(0.005)


def spawn(results: dict, key, client: TestClient, composition: Composition | None, prompt, **body) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.__setitem__(key, complete(client, composition, prompt, **body)))
    thread.start()
    return thread


@contextmanager
def recording(runner) -> Iterator[list[list[SeqStep]]]:
    """Every step's sequences, as the engine hands them to the runner."""
    steps: list[list[SeqStep]] = []
    execute = runner.execute

    def spy(seqs: list[SeqStep]):
        steps.append(list(seqs))
        return execute(seqs)

    runner.execute = spy
    try:
        yield steps
    finally:
        del runner.execute


# --------------------------------------------------------------------------- outputs equal the merged model


@pytest.mark.parametrize("composition", COMPOSITIONS, ids=["two", "three-neg", "three-alpha-pattern", "half"])
def test_composition_equals_merged_weights(world, composition):
    client, models = world
    for prompt in (SHORT, LONG):  # LONG's prefill runs the torch backend's dense path for every term
        assert_matches(complete(client, composition, prompt), models, composition, models.ids(prompt))
    assert models.greedy(composition, models.ids(LONG)) != models.greedy((), models.ids(LONG))
    assert_released(client)


def test_weight_zero_is_the_base_model_and_model_may_name_the_base(world):
    client, models = world
    ids = models.ids(LONG)
    base = complete(client, None, LONG).json()["choices"][0]["text"]
    assert base == models.text((), ids)
    assert complete(client, (("all-r8", 0.0),), LONG).json()["choices"][0]["text"] == base
    zero_pair = (("mlp-r16", 0.0), ("attn-r4", -0.0))
    assert complete(client, zero_pair, LONG, model="tiny").json()["choices"][0]["text"] == base
    assert_matches(complete(client, TWO, LONG, model="tiny"), models, TWO, ids)
    # One adapter at weight 1 is the plain path, and equals that adapter alone.
    one = complete(client, (("r3-pattern", 1.0),), LONG)
    assert one.json()["choices"][0]["text"] == complete(client, None, LONG, model="r3-pattern").json()["choices"][0][
        "text"
    ]
    assert_matches(one, models, (("r3-pattern", 1.0),), ids)
    assert_released(client)


def test_logits_equal_the_merged_model_at_every_position(world):
    """The runner's logits for every prefix of prompt + reference continuation, against the merged model's."""
    client, models = world
    state = client.app.state.loraplex
    engine = state.serving.engine
    for composition in (TWO, THREE, THREE_B):
        ids = models.ids(LONG) + models.greedy(composition, models.ids(LONG))
        with torch.inference_mode():
            expected = models.model(composition)(torch.tensor([ids])).logits[0].float()
        stored = [state.serving.store.get(name) for name, _ in composition]
        first = len(models.ids(LONG)) - 1

        def forward(stored=stored, composition=composition, ids=ids, first=first):
            sched = engine.scheduler
            got = [sched.residency.acquire(a, sched.busy_slots()) for a in stored]
            blocks = [sched.blocks.allocate(sched.blocks.blocks_for(n + 1)) or [] for n in range(first, len(ids))]
            try:
                assert all(g.slot >= 0 for g in got), got  # loaded by the fixture
                composed = tuple((g.slot, w) for g, (_, w) in zip(got, composition, strict=True))
                prefixes = zip(range(first, len(ids)), blocks, strict=True)
                seqs = [SeqStep(ids[: n + 1], 0, b, composed, True) for n, b in prefixes]
                return engine.runner.execute(seqs)
            finally:
                for b in blocks:
                    sched.blocks.release(b)

        logits = engine.call(forward).result(30)
        torch.testing.assert_close(logits, expected[first:], rtol=1e-4, atol=3e-4)
        assert torch.equal(logits.argmax(-1)[:-1], torch.tensor(ids[first + 1 :]))  # the greedy tokens
    assert_released(client)


def test_prompt_list_shares_one_composition(world):
    client, models = world
    r = complete(client, THREE, [SHORT, LONG])
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["text"] for c in choices] == [models.text(THREE, models.ids(p)) for p in (SHORT, LONG)]
    assert_released(client)


def test_streaming_composition(world):
    client, models = world
    body = {"prompt": SHORT, "max_tokens": MAX_NEW, "temperature": 0, "stream": True, "adapters": adapters(THREE)}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["x-loraplex-adapter"].count(",") == 2
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    text = "".join(e["choices"][0]["text"] for e in map(json.loads, lines[:-1]) if e["choices"])
    assert text == models.text(THREE, models.ids(SHORT))
    assert_released(client)


def test_chat_completions_accept_adapters(world):
    client, models = world
    messages = [{"role": "system", "content": "hello world"}, {"role": "user", "content": "the quick brown fox"}]
    text = models.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = models.tok(text, add_special_tokens=False)["input_ids"]
    body = {"model": "tiny", "messages": messages, "max_tokens": MAX_NEW, "temperature": 0}
    r = client.post("/v1/chat/completions", json=body | {"adapters": adapters(THREE_B)})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["message"]["content"] == models.text(THREE_B, ids)
    assert out["usage"]["completion_tokens"] == len(models.greedy(THREE_B, ids))
    assert len(r.headers["x-loraplex-adapter"].split(",")) == 3
    bad = client.post("/v1/chat/completions", json=body | {"model": "r1", "adapters": adapters(TWO)})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"
    assert_released(client)


# --------------------------------------------------------------------------- one batch with other requests


def test_composed_requests_share_steps_with_plain_requests(world):
    """Composed, single-adapter and base-only requests in the same engine steps; each equals its own reference."""
    client, models = world
    engine = client.app.state.loraplex.serving.engine
    plan = [
        (THREE, LONG, ""),
        (None, SHORT, ""),  # base only
        (None, LONG, "all-r8"),  # one adapter, the plain path
        (TWO, SHORT, ""),
        (HALF, LONG, ""),
        (None, SHORT, "tiny:mlp-r16"),
    ]
    results: dict[int, object] = {}
    with recording(engine.runner) as steps:
        with paused(engine):  # every request is taken before the next step
            threads = [spawn(results, i, client, c, p, model=m) for i, (c, p, m) in enumerate(plan)]
            wait_for_inbox(engine, len(plan))
        for t in threads:
            t.join(60)
    for i, (composition, prompt, model) in enumerate(plan):
        reference = composition or (((model.removeprefix("tiny:"), 1.0),) if model else ())
        assert_matches(results[i], models, reference, models.ids(prompt))

    def kinds(seqs: list[SeqStep]) -> set[str]:
        return {"composed" if s.composed else "adapter" if s.slot >= 0 else "base" for s in seqs}

    # Every kind in one step: the first one (all prefills) and the decodes after it.
    assert kinds(steps[0]) == {"composed", "adapter", "base"} and len(steps[0]) == len(plan), steps[0]
    assert sum(kinds(seqs) == {"composed", "adapter", "base"} for seqs in steps) >= MAX_NEW // 2
    assert max(sum(1 for s in seqs if s.composed) for seqs in steps) == 3  # the three composing requests together
    assert_released(client)


# --------------------------------------------------------------------------- two slots: headers, limits, errors


def test_headers_name_each_composed_adapter_in_order(small):
    client, models = small
    # name@version, the version's first 12 hex digits (as for a single adapter)
    versions = {n: client.get(f"/admin/adapters/{n}").json()["version"][:12] for n in ("r1", "attn-r4", "mlp-r16")}
    pair = (("r1", 0.5), ("attn-r4", -1.0))
    r = complete(client, pair, SHORT)
    assert_matches(r, models, pair, models.ids(SHORT))
    assert r.headers["x-loraplex-adapter"] == f"r1@{versions['r1']},attn-r4@{versions['attn-r4']}"
    assert r.headers["x-loraplex-adapter-cache"] == "disk,disk"  # first use
    r = complete(client, pair[::-1], SHORT)
    assert r.headers["x-loraplex-adapter"] == f"attn-r4@{versions['attn-r4']},r1@{versions['r1']}"
    assert r.headers["x-loraplex-adapter-cache"] == "device,device"
    assert r.json()["choices"][0]["text"] == models.text(pair, models.ids(SHORT))  # the sum does not depend on order
    assert complete(client, None, SHORT, model="mlp-r16").status_code == 200  # takes one of the two slots
    r = complete(client, pair, SHORT)
    tiers = r.headers["x-loraplex-adapter-cache"].split(",")
    assert len(tiers) == 2 and sorted(tiers) == ["device", "host"], tiers
    assert_matches(r, models, pair, models.ids(SHORT))
    one = complete(client, (("mlp-r16", 0.5),), SHORT)
    assert one.headers["x-loraplex-adapter"] == f"mlp-r16@{versions['mlp-r16']}"
    assert one.headers["x-loraplex-adapter-cache"] == "host"  # the pair took both slots
    assert "x-loraplex-adapter" not in complete(client, None, SHORT).headers
    assert_released(client)


def test_compositions_wait_for_slots_all_or_none(small):
    """Two slots, requests needing 1 or 2 of three adapters at once: each gets all its slots together, none hangs."""
    client, models = small
    plan = [
        ((("all-r8", 0.7), ("rslora-r12", -0.4)), LONG, ""),
        (None, SHORT, "attn-r4"),
        ((("attn-r4", 1.0), ("all-r8", 0.5)), SHORT, ""),
        ((("rslora-r12", 1.0), ("attn-r4", 2.0)), LONG, ""),
        (None, LONG, ""),
        ((("rslora-r12", 0.3),), SHORT, ""),
    ]
    results: dict[int, object] = {}

    def send(i, composition, prompt, model):
        results[i] = complete(client, composition, prompt, model=model)

    threads = [threading.Thread(target=send, args=(i, *p)) for i, p in enumerate(plan)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads)
    for i, (composition, prompt, model) in enumerate(plan):
        assert_matches(results[i], models, composition or (((model, 1.0),) if model else ()), models.ids(prompt))
    assert_released(client)


def test_a_younger_request_does_not_take_the_slot_an_older_composition_waits_for(models, tmp_path):
    """Two slots; one adapter busy on one of them; a composition of two others waits for both slots.

    The held slot must drain for the older waiter (as it does for a single-adapter
    waiter): a request for the busy adapter arriving later waits behind the
    composition. Otherwise, under steady traffic for the busy adapter, the
    composition never gets its second slot and fails with 503 after
    ``--adapter-wait-timeout``.
    """
    pair = (("all-r8", 0.5), ("attn-r4", -0.5))
    busy = "mlp-r16"
    with serve(models, tmp_path, max_loras=2) as client:
        engine = client.app.state.loraplex.serving.engine
        for name in ("all-r8", "attn-r4", busy):  # each in host memory, the busy one on a slot
            assert complete(client, None, SHORT, model=name).status_code == 200
        results: dict[str, object] = {}
        with recording(engine.runner) as steps:
            with paused(engine):
                threads = [spawn(results, f"busy-{i}", client, None, LONG, model=busy, max_tokens=40,
                                 ignore_eos=True) for i in range(2)]
                wait_for_inbox(engine, 2)
                threads.append(spawn(results, "composed", client, pair, SHORT))
                wait_for_inbox(engine, 3)
            deadline = time.monotonic() + 30
            while len(steps) < 3:  # the busy requests run, the composition waits for its second slot
                assert time.monotonic() < deadline
                time.sleep(0.005)
            with paused(engine):
                threads.append(spawn(results, "younger", client, None, SHORT, model=busy))
                wait_for_inbox(engine, 1)
            for t in threads:
                t.join(60)
        for key, result in results.items():
            assert result.status_code == 200, (key, result.text)
        assert_matches(results["composed"], models, pair, models.ids(SHORT))
        assert_matches(results["younger"], models, ((busy, 1.0),), models.ids(SHORT))
        busy_slot = steps[0][0].slot
        assert [s.slot for s in steps[0]] == [busy_slot, busy_slot]  # the composition did not start at once
        composed_first = next(i for i, seqs in enumerate(steps) if any(s.composed for s in seqs))
        younger_first = next(i for i, seqs in enumerate(steps) if i > 0 and any(s.start == 0 for s in seqs)
                             and not any(s.composed for s in seqs))
        assert composed_first < younger_first, (
            f"the younger {busy} request started at step {younger_first}, before the older composition "
            f"(step {composed_first}): the slot it waits for was not drained"
        )
        assert_released(client)


def test_newer_requests_for_other_adapters_do_not_starve_a_waiting_composition(models, tmp_path):
    """Two slots; a long request holds one; a composition of two other adapters waits for both; newer short
    requests for yet other adapters keep arriving. Slots go out in arrival order: the composition runs as soon
    as the long request ends, before the newer requests, well within ``--adapter-wait-timeout``. (Before, each
    newer request took the slot the composition had just given back, and it waited for all of them.)
    """
    pair = (("all-r8", 0.5), ("attn-r4", -1.0))
    busy = "mlp-r16"
    rotating = ("rslora-r12", "r1", "r3-pattern", "alpha-pattern")
    newer = 8
    with serve(models, tmp_path, max_loras=2, adapter_wait_timeout=20.0) as client:
        engine = client.app.state.loraplex.serving.engine
        for name in (*rotating, "all-r8", "attn-r4", busy):  # each in host memory; busy last, so on a slot
            assert complete(client, None, SHORT, model=name).status_code == 200
        results: dict[object, object] = {}
        threads: list[threading.Thread] = []

        def arrive(first: int, last: int) -> None:
            for i in range(first, last):  # one by one, so the engine takes them in this order
                threads.append(spawn(results, i, client, None, SHORT, model=rotating[i % len(rotating)]))
                wait_for_inbox(engine, i - first + 1)

        with recording(engine.runner) as steps:
            with paused(engine):
                threads.append(spawn(results, "busy", client, None, LONG, model=busy, max_tokens=60, ignore_eos=True))
                wait_for_inbox(engine, 1)
                threads.append(spawn(results, "composed", client, pair, SHORT))
                wait_for_inbox(engine, 2)
            with paused(engine):  # the first newer ones come once the composition waits
                arrive(0, newer // 2)
            deadline = time.monotonic() + 30
            while len(steps) < 8:  # more keep coming while the long request runs
                assert time.monotonic() < deadline
                time.sleep(0.005)
            with paused(engine):
                arrive(newer // 2, newer)
            for t in threads:
                t.join(90)
        assert not any(t.is_alive() for t in threads)
        for key, result in results.items():
            assert result.status_code == 200, (key, result.text)
        assert_matches(results["composed"], models, pair, models.ids(SHORT))
        short = len(models.ids(SHORT))
        assert not any(s.composed for s in steps[0]), "the composition did not have to wait: no scenario"
        composed_first = next(i for i, seqs in enumerate(steps) if any(s.composed for s in seqs))
        newer_starts = [i for i, seqs in enumerate(steps) for s in seqs
                        if s.start == 0 and not s.composed and len(s.token_ids) == short]
        assert len(newer_starts) == newer, newer_starts
        ahead = sum(i < composed_first for i in newer_starts)
        assert ahead <= newer // 4, (
            f"{ahead} of {newer} newer requests started before the composition (step {composed_first}): "
            "the slots it waited for went to newer requests"
        )
        assert_released(client)


def test_failed_adapter_in_a_composition_releases_everything(small):
    """One adapter that does not fit, or fails to load, fails the request; the others' slots and leases are freed."""
    client, models = small
    r = complete(client, (("r1", 0.5), ("bad-shape", 0.5)), SHORT)
    assert r.status_code == 400, r.text
    assert "bad-shape" in r.json()["error"]["message"] and r.json()["error"]["param"] == "adapters"
    assert_released(client)
    if not (models.store / "nan-weights").exists():  # placed after start-up: the lookup passes, the loader refuses
        edit_adapter(shutil.copytree(models.store / "r1", models.store / "nan-weights"), tensors=_poison)
    r = complete(client, (("r1", 0.5), ("nan-weights", 0.5)), SHORT)  # r1 gets a slot first, then gives it back
    assert r.status_code == 400, r.text
    assert "nan-weights" in r.json()["error"]["message"] and "cannot be loaded" in r.json()["error"]["message"]
    assert_released(client)
    pair = (("r1", 0.5), ("rslora-r12", -1.0))
    assert_matches(complete(client, pair, SHORT), models, pair, models.ids(SHORT))
    assert_released(client)


def test_more_adapters_than_slots_is_refused_naming_the_limit(small):
    client, _ = small
    r = complete(client, THREE, SHORT)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "at most 2" in error["message"] and error["param"] == "adapters"
    assert_released(client)


@pytest.mark.parametrize(
    ("body", "status", "param", "fragment"),
    [
        ({"adapters": [{"name": "r1"}, {"name": "r1", "weight": 0.5}]}, 400, "adapters", "twice"),
        ({"model": "r1", "adapters": [{"name": "attn-r4"}, {"name": "r1"}]}, 400, "model", "must name the base"),
        ({"model": "tiny:r1", "adapters": [{"name": "attn-r4", "weight": 0.5}]}, 400, "model", "must name the base"),
        ({"adapters": [{"name": "r1"}, {"name": "no-such-adapter"}]}, 404, "adapters", "does not exist"),
        ({"adapters": [{"name": "no-such-adapter", "weight": 0.5}]}, 404, "adapters", "does not exist"),
        ({"adapters": [{"name": "r1", "weight": 1e9}]}, 400, "adapters[0].weight", "must be less than or equal to 100"),
        ({"adapters": [{"name": "r1", "weight": -101}, {"name": "attn-r4"}]}, 400, "adapters[0].weight",
         "must be greater than or equal to -100"),
        ({"adapters": [{"name": "r1", "weight": "nan"}]}, 400, "adapters[0].weight", "must be a finite number"),
        ({"adapters": [{"name": "r1", "weight": "-inf"}]}, 400, "adapters[0].weight", "must be a finite number"),
        ({"adapters": [{"name": "", "weight": 1}]}, 400, "adapters[0].name", "at least 1 character"),
        ({"adapters": [{"name": "r1", "scale": 2}]}, 400, "adapters[0].scale",
         "Unrecognized request argument supplied: adapters[0].scale"),
    ],
    ids=["duplicate", "model-adapter", "model-base-adapter", "unknown-second", "unknown", "1e9", "-101", "nan-str",
         "inf-str", "empty-name", "extra-field"],
)
def test_bad_compositions_get_clear_errors(small, body, status, param, fragment):
    client, _ = small
    r = client.post("/v1/completions", json={"prompt": SHORT, "max_tokens": 4, **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"], error
    if param is not None:
        assert error["param"] == param
    assert_released(client)  # a lease taken before the failing name is given back


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e309"])
def test_non_finite_weights_in_raw_json_are_400(small, literal):
    """JSON clients can send NaN and Infinity literals (Python's json reads them); they never reach the engine."""
    client, _ = small
    raw = '{"prompt": "hello", "max_tokens": 2, "adapters": [{"name": "r1", "weight": ' + literal + "}]}"
    r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith("adapters[0].weight: must be a finite number"), r.text
    assert_released(client)


def test_a_composition_that_pins_leave_no_room_for_fails_at_once_then_runs_after_unpin(models, tmp_path):
    """Two slots, one pinned by another adapter: a two-adapter composition can never run, so it is told at once
    (503 naming the pins), not after the adapter wait bound; after the unpin it runs and equals the reference."""
    with serve(models, tmp_path, max_loras=2) as client:
        assert client.post("/admin/adapters/r1/load", json={"pin": True}).status_code == 200
        started = time.monotonic()
        r = complete(client, TWO, SHORT)
        assert r.status_code == 503, r.text
        assert time.monotonic() - started < 10  # the wait bound is 30 s
        assert "pinned" in r.json()["error"]["message"] and "Retry-After" in r.headers
        assert client.post("/admin/adapters/r1/unpin").status_code == 200
        assert_matches(complete(client, TWO, SHORT), models, TWO, models.tok(SHORT)["input_ids"])
        assert_released(client)
