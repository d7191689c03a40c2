"""The real server, driven by the official ``openai`` client, on a tiny random llama.

Models, completions (one prompt and a list), chat, streaming with usage, errors,
adapter headers, weighted adapter composition against a merged-weights reference,
API keys with adapter globs, and overload (429 with ``Retry-After``). Every greedy
answer is compared with transformers (+ PEFT) run on the same token ids.
"""

from __future__ import annotations

import collections
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from openai.types import Completion
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tests.helpers.reference import greedy, merged_model, peft_model
from tests.helpers.server_process import running_server
from tests.helpers.tiny import AdapterSpec, make_adapter
from tests.helpers.tiny_server import save_tiny_model

BASE = "tiny"  # the served name: the model folder's name
N = 8  # new tokens per request
ADAPTERS = (
    AdapterSpec("a", 8, 16, ("q_proj", "v_proj", "down_proj")),
    AdapterSpec("b", 4, 8, ("q_proj", "o_proj", "gate_proj", "up_proj")),
    AdapterSpec("other", 4, 8, ("k_proj", "up_proj")),
    AdapterSpec("team-a-x", 4, 8, ("q_proj", "v_proj")),
)
NAMES = sorted(spec.name for spec in ADAPTERS)
PROMPTS = ["the quick brown fox", "hello world, this is"]
MESSAGES = [
    {"role": "system", "content": "you are a tiny model"},
    {"role": "user", "content": "a multi adapter lora server"},
]
OPEN_KEY = "sk-open-0000"
TEAM_KEY = "sk-team-a-0000"


@dataclass
class World:
    model_dir: Path
    store: Path
    base: PreTrainedModel
    tok: PreTrainedTokenizerBase
    _refs: dict[str | None, PreTrainedModel] = field(default_factory=dict)

    def ids(self, prompt: str) -> list[int]:
        return self.tok(prompt)["input_ids"]

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def expected(self, adapter: str | None, ids: list[int], model: PreTrainedModel | None = None) -> str:
        """The reference greedy text: transformers + PEFT (or ``model``), with a precondition of no early EOS."""
        if model is None:
            if adapter not in self._refs:
                self._refs[adapter] = peft_model(self.base, self.store / adapter if adapter else None)
            model = self._refs[adapter]
        out = greedy(model, ids, N, eos_token_id=0)
        assert len(out) == N and 0 not in out, "the reference stopped early: pick another prompt"
        return self.tok.decode(out, skip_special_tokens=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    model_dir, base, tok = save_tiny_model(tmp_path_factory.mktemp("model") / BASE)
    store = tmp_path_factory.mktemp("store")
    for seed, spec in enumerate(ADAPTERS, 1):
        make_adapter(base, spec, store, seed=seed)
    return World(model_dir, store, base, tok)


def _serve(world: World, tmp_path_factory, name: str, *extra: str):
    # No --cache-dir: the machine's default cache, so the CPU kernel is compiled once per machine, not per run
    # (a model directory needs no conversion, so nothing else is written there).
    args = ["--model", str(world.model_dir), "--adapters-dir", str(world.store)]
    args += ["--max-lora-rank", "16", "--max-loras", "4", "--kv-cache-tokens", "4096", *extra]
    return running_server(args, tmp_path_factory.mktemp("logs") / f"{name}.log")


def _client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    with _serve(world, tmp_path_factory, "open") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with _client(server) as c:
        yield c


@pytest.fixture(scope="module")
def keyed(world, tmp_path_factory):
    """A server with two keys: one for every adapter (trailing spaces), one for ``team-a-*`` only."""
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# key  adapters\n{OPEN_KEY}  \n{TEAM_KEY} team-a-*\n")
    with _serve(world, tmp_path_factory, "keys", "--api-keys-file", str(keys)) as url:
        yield url


def _parent(model) -> str | None:
    return (model.model_extra or {}).get("parent")


def _compose(*terms: tuple[str, float]) -> dict:
    return {"adapters": [{"name": name, "weight": weight} for name, weight in terms]}


def _merged(world: World, terms: tuple[tuple[str, float], ...]) -> PreTrainedModel:
    """The base model with ``weight * scale * B @ A`` of each adapter merged into each weight it targets."""
    return merged_model(world.base, [(world.store / name, weight) for name, weight in terms])


# --- models, completions, chat --------------------------------------------------------------------------------------


def test_models_list_base_first_then_adapters_with_parent(client):
    models = client.models.list().data
    assert [m.id for m in models] == [BASE, *NAMES]
    assert _parent(models[0]) is None
    assert [_parent(m) for m in models[1:]] == [BASE] * len(NAMES)
    assert {m.object for m in models} == {"model"}


def test_completion_with_adapter_equals_peft(world, client):
    ids = world.ids(PROMPTS[0])
    expected = world.expected("a", ids)
    assert expected != world.expected(None, ids)  # the adapter changes the answer
    r = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=N, temperature=0)
    assert r.object == "text_completion" and r.model == "a"
    assert [(c.index, c.text, c.finish_reason) for c in r.choices] == [(0, expected, "length")]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), N, len(ids) + N)


def test_completion_with_a_list_of_prompts_has_one_choice_each(world, client):
    r = client.completions.create(model="b", prompt=PROMPTS, max_tokens=N, temperature=0)
    expected = [world.expected("b", world.ids(p)) for p in PROMPTS]
    assert [(c.index, c.text, c.finish_reason) for c in r.choices] == [
        (0, expected[0], "length"),
        (1, expected[1], "length"),
    ]
    prompt_tokens = sum(len(world.ids(p)) for p in PROMPTS)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, 2 * N)
    assert r.usage.total_tokens == prompt_tokens + 2 * N
    # The same prompts as token ids.
    by_ids = client.completions.create(model="b", prompt=[world.ids(p) for p in PROMPTS], max_tokens=N, temperature=0)
    assert [c.text for c in by_ids.choices] == expected and by_ids.usage == r.usage


@pytest.mark.parametrize("adapter", [None, "a"])
def test_chat_renders_the_chat_template(world, client, adapter):
    ids = world.chat_ids(MESSAGES)
    expected = world.expected(adapter, ids)
    r = client.chat.completions.create(model=adapter or BASE, messages=MESSAGES, max_tokens=N, temperature=0)
    assert r.object == "chat.completion" and r.model == (adapter or BASE)
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert (choice.index, choice.message.role, choice.message.content) == (0, "assistant", expected)
    assert choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), N)


def test_a_repeated_conversation_reports_its_cached_prompt_tokens(world, client):
    system = "you answer in one word. " * 6 + "this conversation is only in this test."
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "hello world"}]
    ids = world.chat_ids(messages)
    cached = []
    for _ in range(2):
        r = client.chat.completions.create(model="a", messages=messages, max_tokens=N, temperature=0)
        assert r.choices[0].message.content == world.expected("a", ids)
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
    assert cached == [0, (len(ids) - 1) // 16 * 16] and cached[1] >= 32


# --- streaming -----------------------------------------------------------------------------------------------------


def test_streamed_completions_equal_non_streamed(client):
    kwargs = {"model": "b", "prompt": PROMPTS, "max_tokens": N, "temperature": 0}
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    *data, last = chunks
    assert last.choices == [] and last.usage == full.usage
    assert all(c.choices and c.usage is None for c in data)
    texts: dict[int, str] = collections.defaultdict(str)
    finished: dict[int, list[tuple[int, str]]] = collections.defaultdict(list)
    seen: dict[int, int] = {}
    for n, chunk in enumerate(data):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            seen[choice.index] = n
            if choice.finish_reason:
                finished[choice.index].append((n, choice.finish_reason))
    assert dict(texts) == {c.index: c.text for c in full.choices}
    # Exactly one finish_reason per choice, on that choice's last chunk.
    assert dict(finished) == {0: [(seen[0], "length")], 1: [(seen[1], "length")]}
    # Without include_usage, no chunk carries usage.
    assert all(c.usage is None for c in client.completions.create(**kwargs, stream=True))


def test_streamed_chat_equals_non_streamed(client):
    kwargs = {"model": "a", "messages": MESSAGES, "max_tokens": N, "temperature": 0}
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    *data, last = chunks
    assert last.choices == [] and last.usage == full.usage
    assert all(c.object == "chat.completion.chunk" and len(c.choices) == 1 and c.usage is None for c in data)
    assert data[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in data) == full.choices[0].message.content
    assert [(n, c.choices[0].finish_reason) for n, c in enumerate(data) if c.choices[0].finish_reason] == [
        (len(data) - 1, "length")
    ]


# --- errors and headers --------------------------------------------------------------------------------------------


def test_unknown_adapter_is_not_found(client):
    for call in (
        lambda: client.completions.create(model="zzz-missing", prompt="hello", max_tokens=2),
        lambda: client.chat.completions.create(model="zzz-missing", messages=MESSAGES, max_tokens=2),
        lambda: client.completions.create(model="zzz-missing", prompt="hello", max_tokens=2, stream=True),
        lambda: client.completions.create(model=f"{BASE}:zzz-missing", prompt="hello", max_tokens=2),
        lambda: client.completions.create(
            model=BASE, prompt="hello", max_tokens=2, extra_body=_compose(("a", 0.5), ("zzz-missing", 1.0))
        ),
    ):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        body = info.value.body
        assert info.value.status_code == 404
        assert set(body) == {"message", "type", "param", "code"}
        assert "zzz-missing" in body["message"] and "does not exist" in body["message"]
        assert (body["type"], body["code"]) == ("not_found_error", "adapter_not_found")


def test_past_the_context_limit_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="a", prompt="hello", max_tokens=600)
    assert "exceeds the context limit of 512 tokens" in info.value.message
    assert (info.value.body["code"], info.value.body["param"]) == ("context_length_exceeded", "max_tokens")
    with pytest.raises(openai.BadRequestError, match="context limit of 512 tokens"):
        client.chat.completions.create(model="a", messages=MESSAGES, max_tokens=600)
    with pytest.raises(openai.BadRequestError, match="the context limit is 512 tokens"):
        client.completions.create(model="a", prompt="hello " * 600, max_tokens=1)


def test_adapter_headers_name_the_version_and_the_tier(server, client):
    version = httpx.get(f"{server}/admin/adapters/a").json()["version"]
    tiers = []
    for _ in range(2):
        raw = client.completions.with_raw_response.create(model="a", prompt=PROMPTS[1], max_tokens=2, temperature=0)
        m = re.fullmatch(r"a@([0-9a-f]{12,64})", raw.headers["x-loraplex-adapter"])
        assert m and version.startswith(m.group(1)), raw.headers["x-loraplex-adapter"]
        tiers.append(raw.headers["x-loraplex-adapter-cache"])
        assert raw.parse().usage.completion_tokens == 2
    assert tiers[0] in ("device", "host", "disk")
    assert tiers[1] == "device"  # just used, and the server has free slots: still there
    raw = client.completions.with_raw_response.create(model=BASE, prompt=PROMPTS[1], max_tokens=2)
    assert "x-loraplex-adapter" not in raw.headers and "x-loraplex-adapter-cache" not in raw.headers


# --- composition ---------------------------------------------------------------------------------------------------


def test_composition_equals_merged_weights(world, client):
    terms = (("a", 0.5), ("b", -1.0))
    ids = world.ids(PROMPTS[0])
    expected = world.expected(None, ids, model=_merged(world, terms))
    assert expected not in {world.expected(name, ids) for name in (None, "a", "b")}  # the terms matter
    raw = client.completions.with_raw_response.create(
        model=BASE, prompt=PROMPTS[0], max_tokens=N, temperature=0, extra_body=_compose(*terms)
    )
    r = raw.parse()
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "length")
    assert [ref.split("@")[0] for ref in raw.headers["x-loraplex-adapter"].split(",")] == ["a", "b"]
    tiers = raw.headers["x-loraplex-adapter-cache"].split(",")
    assert len(tiers) == 2 and set(tiers) <= {"device", "host", "disk"}
    # The same composition in a chat, streamed.
    chat_expected = world.expected(None, world.chat_ids(MESSAGES), model=_merged(world, terms))
    stream = client.chat.completions.create(
        model=BASE, messages=MESSAGES, max_tokens=N, temperature=0, stream=True, extra_body=_compose(*terms)
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat_expected


def test_composition_rules(world, client):
    with pytest.raises(openai.BadRequestError, match="must name the base model"):
        client.completions.create(model="a", prompt="hello", max_tokens=2, extra_body=_compose(("b", 1.0)))
    with pytest.raises(openai.BadRequestError, match="lists an adapter twice"):
        client.completions.create(model=BASE, prompt="hello", max_tokens=2, extra_body=_compose(("a", 1), ("a", 1)))
    # One adapter at full weight is that adapter.
    r = client.completions.create(
        model=BASE, prompt=PROMPTS[1], max_tokens=N, temperature=0, extra_body=_compose(("a", 1.0))
    )
    assert r.choices[0].text == world.expected("a", world.ids(PROMPTS[1]))


# --- API keys ------------------------------------------------------------------------------------------------------


def test_keys_are_required_except_for_health(keyed):
    assert httpx.get(keyed + "/health").status_code == 200
    assert httpx.get(keyed + "/ready").status_code == 200
    r = httpx.post(keyed + "/v1/completions", json={"model": BASE, "prompt": "hello", "max_tokens": 2})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "authentication_error"
    with _client(keyed, "placeholder") as c:  # the client insists on a key: drop the header it makes of it
        with pytest.raises(openai.AuthenticationError) as info:
            c.completions.create(model=BASE, prompt="hello", max_tokens=2, extra_headers={"Authorization": openai.omit})
        assert "authorization" not in info.value.response.request.headers
        assert info.value.body["code"] == "invalid_api_key"
    for key in ("sk-wrong-0000", OPEN_KEY + "x", OPEN_KEY[:-1], TEAM_KEY.upper()):
        with _client(keyed, key) as c:
            with pytest.raises(openai.AuthenticationError) as info:
                c.completions.create(model=BASE, prompt="hello", max_tokens=2)
            assert info.value.status_code == 401
            with pytest.raises(openai.AuthenticationError):
                c.models.list()
            with pytest.raises(openai.AuthenticationError):
                c.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=2)


def test_team_key_may_use_only_its_adapters(world, keyed):
    with _client(keyed, TEAM_KEY) as c:
        assert [m.id for m in c.models.list().data] == [BASE, "team-a-x"]
        ids = world.ids(PROMPTS[0])
        r = c.completions.create(model="team-a-x", prompt=PROMPTS[0], max_tokens=N, temperature=0)
        assert r.choices[0].text == world.expected("team-a-x", ids)
        r = c.completions.create(model=BASE, prompt=PROMPTS[0], max_tokens=N, temperature=0)
        assert r.choices[0].text == world.expected(None, ids)
        r = c.chat.completions.create(model="team-a-x", messages=MESSAGES, max_tokens=N, temperature=0)
        assert r.choices[0].message.content == world.expected("team-a-x", world.chat_ids(MESSAGES))
        forbidden = (
            lambda: c.completions.create(model="other", prompt="hello", max_tokens=2),
            lambda: c.completions.create(model=f"{BASE}:other", prompt="hello", max_tokens=2),
            lambda: c.chat.completions.create(model="other", messages=MESSAGES, max_tokens=2),
            # 403 whether or not the adapter exists: a key learns nothing about adapters outside its globs.
            lambda: c.completions.create(model="zzz-missing", prompt="hello", max_tokens=2),
            lambda: c.completions.create(
                model=BASE, prompt="hello", max_tokens=2, extra_body=_compose(("team-a-x", 1.0), ("other", 0.5))
            ),
        )
        for call in forbidden:
            with pytest.raises(openai.PermissionDeniedError) as info:
                call()
            assert info.value.body["type"] == "permission_error"
            assert info.value.body["code"] == "adapter_not_allowed"
        # Inside its globs, a missing adapter is an honest 404.
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="team-a-missing", prompt="hello", max_tokens=2)


def test_open_key_sees_every_adapter(world, keyed):
    with _client(keyed, OPEN_KEY) as c:
        assert [m.id for m in c.models.list().data] == [BASE, *NAMES]
        r = c.completions.create(model="other", prompt=PROMPTS[1], max_tokens=N, temperature=0)
        assert r.choices[0].text == world.expected("other", world.ids(PROMPTS[1]))
        terms = (("team-a-x", 1.0), ("other", 0.5))
        r = c.completions.create(
            model=BASE, prompt=PROMPTS[1], max_tokens=N, temperature=0, extra_body=_compose(*terms)
        )
        assert r.choices[0].text == world.expected(None, world.ids(PROMPTS[1]), model=_merged(world, terms))
    # The key also works in the x-api-key header.
    r = httpx.get(keyed + "/v1/models", headers={"x-api-key": TEAM_KEY})
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [BASE, "team-a-x"]


# --- overload ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overloaded(world, tmp_path_factory):
    """One running request and one queued at most."""
    with _serve(world, tmp_path_factory, "overload", "--max-num-seqs", "1", "--max-queued-requests", "1") as url:
        yield url


def test_overload_is_429_with_retry_after_then_recovers(world, overloaded):
    fired = 8
    barrier = threading.Barrier(fired)
    results: list[object] = [None] * fired

    def fire(c: openai.OpenAI, i: int) -> None:
        barrier.wait()  # all at once
        try:
            results[i] = c.completions.create(
                model="a", prompt="hello", max_tokens=400, temperature=0, extra_body={"ignore_eos": True}
            )
        except openai.APIError as exc:
            results[i] = exc

    with _client(overloaded) as c:
        threads = [threading.Thread(target=fire, args=(c, i)) for i in range(fired)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        ok = [r for r in results if isinstance(r, Completion)]
        limited = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert len(ok) + len(limited) == fired, results
        assert len(ok) >= 2 and limited
        for r in ok:
            assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 400)
        for exc in limited:
            assert int(exc.response.headers["retry-after"]) >= 1
            assert (exc.body["type"], exc.body["code"]) == ("rate_limit_error", "server_overloaded")
        # Nothing was left counted: a new request is admitted and answered.
        after = c.completions.create(model="a", prompt=PROMPTS[0], max_tokens=N, temperature=0)
        assert after.choices[0].text == world.expected("a", world.ids(PROMPTS[0]))


def test_a_request_that_can_never_be_admitted_is_not_a_429(overloaded):
    """More prompts than running + queued requests allowed: retrying can never help, so no 429/Retry-After."""
    with _client(overloaded) as c:
        admitted = c.completions.create(model=BASE, prompt=PROMPTS, max_tokens=2, temperature=0)  # two fit
        assert admitted.usage.completion_tokens == 4
        with pytest.raises(openai.BadRequestError) as info:
            c.completions.create(model=BASE, prompt=[*PROMPTS, "a third prompt"], max_tokens=2)
        assert "prompt" in info.value.message and "retry-after" not in info.value.response.headers
