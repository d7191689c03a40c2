"""Structured outputs on a tiny Llama: every answer follows its grammar, in batches that mix grammars, plain
requests, the base model and an adapter; bad grammars are 400s naming their field that disturb nothing.

The outputs are checked with ``jsonschema`` and ``re``, not with the grammar engine that made them. A random
model left alone would never write JSON; it does here only because of the masks. Its strings are bounded by
patterns of ASCII classes: a random model also picks byte sequences no real one writes, and xgrammar admits a
few that are not UTF-8 (the real model's test bounds strings by length: tests/e2e).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import re

import jsonschema
import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from tests.helpers import engine as eng
from tests.helpers.reference import greedy, peft_model
from tests.helpers.tiny import tiny_base_with_adapter

pytestmark = pytest.mark.usefixtures("c_kernels")

MAX_NEW = 160
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
            "address": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z ]{0,6}$"},
                                                         "zip": {"type": "integer", "minimum": 1000, "maximum": 9999}},
                        "required": ["city", "zip"]},
        },
        "required": ["name", "address"],
    },
    "enums": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                       "size": {"type": "string", "enum": ["S", "M", "L"]}},
        "required": ["color", "ok", "size"],
    },
    "array": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z0-9]{1,4}$"},
                                "minItems": 1,
                                "maxItems": 3}},
        "required": ["tags"],
    },
    "bounded-numbers": {
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 65},
                       "score": {"type": "number", "minimum": 0, "maximum": 1},
                       "level": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 4}},
        "required": ["age", "score", "level"],
    },
}
# A template that renders tools and asks for Hermes' <tool_call> tags, as Qwen's and Hermes' do.
TOOLS_TEMPLATE = (
    "{% if tools %}tools: {% for t in tools %}{{ t.function.name }} {% endfor %}as <tool_call>{}</tool_call>\n"
    "{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
PROMPTS = ["the quick brown fox", "hello world", "lora adapters are small", "numbers 1 2 3"]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    tok, base, folder = tiny_base_with_adapter(store)
    tok.chat_template = TOOLS_TEMPLATE
    app = create_app(lambda: eng.build(base, tok, store, tmp_path_factory.mktemp("cache"), kv_tokens=8192))
    with TestClient(app) as c:
        yield c, tok, base, folder


def post(client: TestClient, route: str, body: dict) -> dict:
    r = client.post(route, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_json_schemas_hold_in_mixed_batches_with_and_without_the_adapter(client):
    c, tok, base, folder = client
    jobs = []
    for i, (name, schema) in enumerate(SCHEMAS.items()):
        for model in ("", "good"):
            fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
            jobs.append(("schema", name, {"model": model, "prompt": PROMPTS[i], "max_tokens": MAX_NEW,
                                          "temperature": 0, "response_format": fmt}))
            jobs.append(("schema", name, {"model": model, "prompt": PROMPTS[i], "max_tokens": MAX_NEW,
                                          "temperature": 0.8, "seed": i, "guided_json": schema}))
        jobs.append(("plain", None, {"model": "good", "prompt": PROMPTS[i], "max_tokens": 12, "temperature": 0}))
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: post(c, "/v1/completions", job[2]), jobs))
    for (kind, name, body), answer in zip(jobs, answers, strict=True):
        choice = answer["choices"][0]
        if kind == "plain":  # the grammars beside it changed nothing
            ids = tok(body["prompt"])["input_ids"]
            assert choice["text"] == tok.decode(greedy(peft_model(base, folder), ids, 12, 0), skip_special_tokens=True)
            continue
        assert choice["finish_reason"] == "stop", (name, body.get("model"), choice)
        jsonschema.validate(json.loads(choice["text"]), SCHEMAS[name])


def test_regex_choice_and_grammar_through_every_field(client):
    c, *_ = client
    regex = r"[a-z]{2,5}-[0-9]{3}"
    cases = [
        ({"guided_regex": regex}, lambda t: re.fullmatch(regex, t)),
        ({"structured_outputs": {"regex": regex}}, lambda t: re.fullmatch(regex, t)),
        ({"guided_choice": ["yes", "no", 'say "maybe"']}, lambda t: t in ("yes", "no", 'say "maybe"')),
        ({"structured_outputs": {"choice": ["alpha", "beta"]}}, lambda t: t in ("alpha", "beta")),
        ({"guided_grammar": "root ::= \"(\" [0-9] [0-9]? \")\""}, lambda t: re.fullmatch(r"\(\d{1,2}\)", t)),
        ({"structured_outputs": {"json": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                                          "maxItems": 3}}},
         lambda t: isinstance(json.loads(t), list)),
    ]
    for extra, check in cases:
        for model in ("", "good"):
            answer = post(c, "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 60, "temperature": 0,
                                                 **extra})
            text = answer["choices"][0]["text"]
            assert answer["choices"][0]["finish_reason"] == "stop" and check(text), (extra, model, text)
    chat = post(c, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40,
                                            "temperature": 0, "guided_choice": ["up", "down"]})
    assert chat["choices"][0]["message"]["content"] in ("up", "down")


BAD = [
    ({"guided_json": {"type": "objectx"}}, "guided_json"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "(a"}, "guided_regex"),
    ({"guided_grammar": "root ::= missing"}, "guided_grammar"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer",
                                                                                         "minimum": "a"}}}},
     "response_format.json_schema.schema"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
    ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "structured_outputs.choice"),
    ({"logit_bias": {"320": 1}}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"stop_token_ids": [5000]}, "stop_token_ids"),
    ({"allowed_token_ids": [3, 320]}, "allowed_token_ids"),
    ({"min_tokens": 50, "max_tokens": 10}, "min_tokens"),
]


def test_bad_grammars_and_token_ids_are_400s_naming_the_field_and_disturb_no_running_request(client):
    c, tok, base, folder = client
    prompt = "the lazy dog sleeps"
    ids = tok(prompt)["input_ids"]
    want = tok.decode(greedy(peft_model(base, folder), ids, 60, None), skip_special_tokens=True)
    body = {"model": "good", "prompt": prompt, "max_tokens": 60, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with c.stream("POST", "/v1/completions", json=body) as running:
        lines = running.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        for extra, param in BAD:
            r = c.post("/v1/completions", json={"model": "good", "prompt": prompt, "max_tokens": 10, **extra})
            assert r.status_code == 400, (extra, r.text)
            error = r.json()["error"]
            assert error["param"] == param, (extra, error)
            assert param.split(".")[0] in error["message"] or error["code"] == "invalid_request", error
        rest = [line for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in [first, *rest])
    assert text == want


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}},
                                       "required": ["zone"]}}}
ASK = [{"role": "user", "content": "what is the weather in paris?"}]


def _arguments_valid(call: dict) -> None:
    schema = {"get_weather": WEATHER, "get_time": TIME}[call["function"]["name"]]["function"]["parameters"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
    assert call["type"] == "function" and call["id"].startswith("call_")


def test_forced_tool_calls_parse_into_tool_calls_with_valid_arguments(client):
    c, *_ = client
    for model in ("", "good"):
        named = post(c, "/v1/chat/completions", {
            "model": model, "messages": ASK, "tools": [WEATHER, TIME], "temperature": 0, "max_tokens": 80,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
        message = named["choices"][0]["message"]
        assert message["content"] is None and len(message["tool_calls"]) == 1, message
        assert message["tool_calls"][0]["function"]["name"] == "get_weather"
        _arguments_valid(message["tool_calls"][0])
        required = post(c, "/v1/chat/completions", {
            "model": model, "messages": ASK, "tools": [WEATHER, TIME], "temperature": 0, "max_tokens": 120,
            "tool_choice": "required"})
        choice = required["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["tool_calls"], choice
        for call in choice["message"]["tool_calls"]:
            _arguments_valid(call)
    # Streamed: the named call's arguments arrive as deltas of one call.
    body = {"messages": ASK, "tools": [WEATHER], "temperature": 0, "max_tokens": 80, "stream": True,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [d["tool_calls"][0] for ch in chunks for d in [ch["choices"][0]["delta"]] if d.get("tool_calls")]
    assert deltas[0]["function"]["name"] == "get_weather" and all("id" not in d for d in deltas[1:])
    whole = {**deltas[0], "function": {"name": "get_weather",
                                       "arguments": "".join(d["function"]["arguments"] for d in deltas)}}
    _arguments_valid(whole)
    assert named["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]  # not empty


def test_auto_tool_choice_needs_a_template_that_renders_tools(client, monkeypatch):
    c, tok, *_ = client
    r = c.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "max_tokens": 4})
    assert r.status_code == 200, r.text  # this template renders tools and <tool_call> tags
    monkeypatch.setattr(tok, "chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    r = c.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text
    named = {"type": "function", "function": {"name": "nope"}}
    r = c.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "tool_choice": named})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice.function.name", r.text
    r = c.post("/v1/chat/completions", json={"messages": ASK, "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text
