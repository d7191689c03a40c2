"""The sampling and output options on the real default model, over HTTP, with the official openai client.

- ``response_format`` JSON schemas (nested objects, enums, arrays, bounded numbers and strings) with and without
  an adapter, in one concurrent batch with plain requests: each answer validates with ``jsonschema``; the
  client's ``parse`` reads a pydantic model; ``json_object`` answers parse as objects.
- Tool calls, named and required: the client reads ``tool_calls`` whose arguments validate.
- Penalties and ``min_tokens`` on an adapter: the greedy tokens of transformers + PEFT with its processors.
- Log-probs: transformers' log-softmax within 1e-4.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math

import jsonschema
import openai
import pydantic
import pytest
import torch

from tests.helpers.reference import peft_model
from tests.helpers.server_process import running_server
from tests.helpers.tiny import AdapterSpec, make_adapter

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
ADAPTER = AdapterSpec("extract", 8, 16, ("q_proj", "v_proj", "up_proj"))
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 30},
                                                     "country": {"enum": ["France", "Germany", "Spain", "Other"]}},
                    "required": ["city", "country"]},
    },
    "required": ["name", "age", "address"],
}
SCHEMAS = {
    "person": PERSON,
    "order": {
        "type": "object",
        "properties": {
            "items": {"type": "array", "minItems": 1, "maxItems": 3,
                      "items": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                                                 "qty": {"type": "integer", "minimum": 1,
                                                                         "maximum": 9}},
                                "required": ["sku", "qty"]}},
            "priority": {"enum": ["low", "high"]},
            "paid": {"type": "boolean"},
        },
        "required": ["items", "priority", "paid"],
    },
    "reading": {
        "type": "object",
        "properties": {"celsius": {"type": "number", "minimum": -40, "maximum": 50},
                       "humidity": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}},
        "required": ["celsius", "humidity"],
    },
}
ASK = {
    "person": "Marie Curie was 66 and lived in Paris, France. Give her as JSON.",
    "order": "Order: three ABC widgets, urgent, already paid. As JSON.",
    "reading": "It is 21.5 degrees with 40% humidity. As JSON.",
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}


class Person(pydantic.BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module")
def setup(default_model, tmp_path_factory):
    model, tokenizer = default_model
    store = tmp_path_factory.mktemp("store")
    folder = make_adapter(model, ADAPTER, store, seed=7, std=0.02)
    torch.set_num_threads(2)
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with running_server(["--adapters-dir", str(store), "--max-lora-rank", "16"], log) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0), model, tokenizer, folder


def _chat(client: openai.OpenAI, model: str, content: str, **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          temperature=0, **kwargs)


def test_json_schemas_with_and_without_the_adapter_in_one_batch(setup):
    client, *_ = setup
    jobs = [(name, model) for name in SCHEMAS for model in (MODEL, ADAPTER.name)] + [(None, MODEL), (None, "extract")]

    def run(job):
        name, model = job
        if name is None:
            return _chat(client, model, "Say hello.", max_tokens=24)
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}
        return _chat(client, model, ASK[name], max_tokens=200, response_format=fmt)

    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(run, jobs))
    for (name, model), answer in zip(jobs, answers, strict=True):
        if name is None:
            assert answer.choices[0].message.content
            continue
        assert answer.choices[0].finish_reason == "stop", (name, model, answer.choices[0].message.content)
        jsonschema.validate(json.loads(answer.choices[0].message.content), SCHEMAS[name])

    parsed = client.chat.completions.parse(
        model=ADAPTER.name, messages=[{"role": "user", "content": ASK["person"]}], temperature=0, max_tokens=120,
        response_format=Person,
    )
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person) and person.age >= 0, parsed
    anything = _chat(client, MODEL, "Give a JSON object with the name and population of Paris.", max_tokens=200,
                     response_format={"type": "json_object"})
    assert anything.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(anything.choices[0].message.content), dict)
    picked = _chat(client, ADAPTER.name, "Is the sky blue?", max_tokens=10,
                   extra_body={"guided_choice": ["yes", "no"]})
    assert picked.choices[0].message.content in ("yes", "no")


def test_tool_calls_named_and_required(setup):
    client, *_ = setup
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        answer = _chat(client, ADAPTER.name, "What's the weather in Berlin?", max_tokens=120, tools=[WEATHER],
                       tool_choice=choice)
        calls = answer.choices[0].message.tool_calls
        assert calls and calls[0].function.name == "get_weather", answer
        jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    assert answer.choices[0].finish_reason == "tool_calls"
    with pytest.raises(openai.BadRequestError) as refused:  # SmolLM2's template renders no tools
        _chat(client, MODEL, "What's the weather in Berlin?", max_tokens=8, tools=[WEATHER])
    assert refused.value.param == "tool_choice"


@torch.inference_mode()
def _reference(model, ids: list[int], **kwargs) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, **kwargs)
    return out[0, len(ids):].tolist()


def test_penalties_min_tokens_and_logprobs_equal_transformers(setup):
    client, model, tokenizer, folder = setup
    prompt = "List the days of the week:"
    ids = tokenizer(prompt)["input_ids"]
    ref = peft_model(model, folder)
    eos = tokenizer.eos_token_id
    plain = _reference(ref, ids, max_new_tokens=16, eos_token_id=eos, pad_token_id=eos)
    want = _reference(ref, ids, max_new_tokens=16, repetition_penalty=1.3, min_new_tokens=12, eos_token_id=eos,
                      pad_token_id=eos)
    assert want != plain
    got = client.completions.create(model=ADAPTER.name, prompt=prompt, max_tokens=16, temperature=0, logprobs=3,
                                     extra_body={"repetition_penalty": 1.3, "min_tokens": 12})
    choice = got.choices[0]
    assert choice.text == tokenizer.decode(want, skip_special_tokens=True)
    # Log-probs are the model's (before the penalty), at each position of the penalized answer.
    with torch.inference_mode():
        truth = torch.log_softmax(ref(torch.tensor([ids + want])).logits[0].float(), dim=-1)
    for i, value in enumerate(choice.logprobs.token_logprobs):
        assert math.isclose(value, float(truth[len(ids) - 1 + i, want[i]]), abs_tol=1e-4), i
