"""End to end on the real default model, over HTTP, with the official openai client.

Eight-plus concurrent requests over six adapters (different ranks, target sets,
rsLoRA, a rank pattern) and base-only requests: every greedy output equals
transformers + PEFT run on that request alone.
"""

from __future__ import annotations

import concurrent.futures as cf

import openai
import pytest

from tests.helpers.reference import greedy, merged_model, peft_model
from tests.helpers.server_process import running_server
from tests.helpers.tiny import AdapterSpec, make_adapter

pytestmark = pytest.mark.e2e

ADAPTERS = (
    AdapterSpec("all7-r16", 16, 32, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    AdapterSpec("qv-r8", 8, 16, ("q_proj", "v_proj")),
    AdapterSpec("mlp-r32", 32, 16, ("gate_proj", "up_proj", "down_proj")),
    AdapterSpec("rslora-r4", 4, 4, ("k_proj", "o_proj", "up_proj"), rslora=True),
    AdapterSpec("r1-down", 1, 2, ("down_proj",)),
    AdapterSpec("pattern", 8, 8, ("q_proj", "o_proj", "gate_proj"), rank_pattern={"gate_proj": 24}),
)
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time,",
    "The three primary colors are",
    "Water boils at",
    "My favourite food is",
    "The largest planet in the solar system is",
    "In 1969, astronauts",
    "To make a cup of tea,",
    "The opposite of hot is",
]
PLAN = ["all7-r16", None, "qv-r8", "mlp-r32", "rslora-r4", None, "r1-down", "pattern", "all7-r16", "qv-r8"]
MAX_NEW = 16
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
COMPOSED = (("all7-r16", 0.7), ("mlp-r32", -0.5))


@pytest.fixture(scope="module")
def setup(default_model, tmp_path_factory):
    import torch

    model, tokenizer = default_model
    store = tmp_path_factory.mktemp("store")
    paths = {}
    for i, spec in enumerate(ADAPTERS):
        paths[spec.name] = make_adapter(model, spec, store, seed=100 + i, std=0.05)

    def decode_greedy(reference, ids):
        return tokenizer.decode(greedy(reference, ids, MAX_NEW, tokenizer.eos_token_id), skip_special_tokens=True)

    expected = []
    for prompt, name in zip(PROMPTS, PLAN, strict=True):
        ref = peft_model(model, paths[name] if name else None)
        ids = tokenizer(prompt)["input_ids"]
        expected.append(decode_greedy(ref, ids))
        del ref
    # Chat through SmolLM2's own chat template, with an adapter; and a composition against merged weights.
    chat_ids = tokenizer(
        tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )["input_ids"]
    chat_ref = peft_model(model, paths["qv-r8"])
    expected_chat = decode_greedy(chat_ref, chat_ids)
    del chat_ref
    merged = merged_model(model, [(paths[name], weight) for name, weight in COMPOSED])
    ids = tokenizer(PROMPTS[0])["input_ids"]
    expected_composed = decode_greedy(merged, ids)
    del merged
    torch.set_num_threads(2)
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with running_server(["--adapters-dir", str(store), "--max-lora-rank", "32", "--max-loras", "8"], log) as url:
        yield url, expected, expected_chat, expected_composed


def test_concurrent_mixed_adapters_equal_peft(setup):
    url, expected, *_ = setup
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")

    def run(i):
        r = client.completions.create(
            model=PLAN[i] or "SmolLM2-135M-Instruct", prompt=PROMPTS[i], max_tokens=MAX_NEW, temperature=0
        )
        return r.choices[0].text

    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(run, range(len(PROMPTS))))
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"request {i} (adapter {PLAN[i]}): {g!r} != {e!r}"
    # The adapters change the output, so equality above is not the base model twice.
    base = {expected[i] for i in range(len(PLAN)) if PLAN[i] is None}
    assert sum(expected[i] not in base for i in range(len(PLAN)) if PLAN[i]) >= 6


def test_openai_client_streaming_models_and_errors(setup):
    url, expected, *_ = setup
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "SmolLM2-135M-Instruct" and sorted(ids[1:]) == sorted(a.name for a in ADAPTERS)
    stream = client.completions.create(
        model="qv-r8", prompt=PROMPTS[2], max_tokens=MAX_NEW, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected[2]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="prompt is empty"):
        client.completions.create(model="qv-r8", prompt="", max_tokens=4)


def test_chat_with_the_models_template_and_composition_equal_references(setup):
    url, expected, expected_chat, expected_composed = setup
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    chat = client.chat.completions.create(model="qv-r8", messages=CHAT, max_tokens=MAX_NEW, temperature=0)
    assert chat.choices[0].message.content == expected_chat
    streamed = client.chat.completions.create(
        model="qv-r8", messages=CHAT, max_tokens=MAX_NEW, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected_chat
    composed = client.completions.create(
        model="SmolLM2-135M-Instruct",
        prompt=PROMPTS[0],
        max_tokens=MAX_NEW,
        temperature=0,
        extra_body={"adapters": [{"name": name, "weight": weight} for name, weight in COMPOSED]},
    )
    assert composed.choices[0].text == expected_composed
    # The composition is not one of its adapters alone (PROMPTS[0] ran with all7-r16 at weight 1).
    assert PLAN[0] == COMPOSED[0][0] and expected_composed != expected[0]
