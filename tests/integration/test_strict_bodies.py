"""Strict request bodies on the real server (tiny model): refusals change nothing, and real clients still work.

What the ``openai`` client sends (defaults, nulls, a replayed assistant
message) is accepted and answers exactly as a bare request does; what it sends
through ``extra_body`` that the server does not do comes back as an
``openai.BadRequestError`` with our message, code and param. A refused request
reaches neither the engine nor the adapter cache. The message wording of every
case is covered in ``tests/unit/test_request_errors.py``.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.api import unsupported
from server.api.app import create_app
from tests.helpers import engine as eng
from tests.helpers.tiny import AdapterSpec, make_adapter, make_model, make_tokenizer
from tests.helpers.tiny_server import CHAT_TEMPLATE

ADAPTER = "good"
PROMPT = "the quick brown fox"
MESSAGES = [{"role": "user", "content": "a multi adapter lora server"}]
GREEDY = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
INTERNALS = re.compile(r"function-after|list\[|TextPart|ChatMessage|body\.|Input should|Field required|[a-z]\.\d")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    base = make_model("llama", len(tok), seed=5)
    store = tmp_path_factory.mktemp("store")
    make_adapter(base, AdapterSpec(ADAPTER, 8, 16, ("q_proj", "v_proj")), store, seed=1)
    cache = tmp_path_factory.mktemp("cache")
    app = create_app(lambda: eng.build(base, tok, store, cache, kv_tokens=2048))
    with TestClient(app) as c:
        yield c


def _text(response) -> str:
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def _counters(client: TestClient) -> dict[str, float]:
    """Every counter and histogram count the server exports, by name and labels."""
    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name.endswith(("_total", "_count")):
                out[sample.name + json.dumps(sample.labels, sort_keys=True)] = sample.value
    return out


def _idle(client: TestClient, timeout: float = 5.0) -> None:
    """No request on the engine, no adapter slot or KV block held."""
    engine = client.app.state.loraplex.serving.engine
    sched = engine.scheduler

    def snapshot():
        return sched.has_work, sched.residency.slots_in_use(sched.busy_slots()), sched.blocks.used_blocks

    deadline = time.monotonic() + timeout
    while engine.call(snapshot).result(timeout) != (False, 0, 0):
        assert time.monotonic() < deadline, engine.call(snapshot).result(timeout)
        time.sleep(0.05)


BAD = [  # (route, body or raw bytes, content type, status, code)
    ("/v1/completions", {"model": ADAPTER, "prompt": PROMPT, "foo": 1}, "application/json", 400, "unknown_parameter"),
    ("/v1/completions", {"model": ADAPTER, "prompt": PROMPT, "use_beam_search": True}, "application/json", 400,
     "unsupported_parameter"),
    ("/v1/completions", {"model": ADAPTER, "prompt": PROMPT, "repetition_penalty": 0}, "application/json", 400,
     "invalid_request"),
    ("/v1/completions", {"model": ADAPTER, "prompt": PROMPT, "logprobs": 21}, "application/json", 400,
     "invalid_request"),
    ("/v1/completions", {"model": ADAPTER, "prompt": PROMPT, "min_tokens": 40, "max_tokens": 4}, "application/json",
     400, "invalid_sampling_parameters"),
    ("/v1/completions", {"model": ADAPTER, "prompt": PROMPT, "logit_bias": {"99999999": 5}}, "application/json", 400,
     "invalid_logit_bias"),
    ("/v1/completions", {"model": ADAPTER, "prompt": PROMPT, "guided_regex": "(a"}, "application/json", 400,
     "invalid_structured_output"),
    ("/v1/chat/completions", {"model": ADAPTER, "messages": MESSAGES, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "application/json", 400, "invalid_structured_output"),
    ("/v1/chat/completions", {"model": ADAPTER, "messages": MESSAGES, "tools": [{"type": "function"}]},
     "application/json", 400, "invalid_request"),
    ("/v1/chat/completions",
     {"model": ADAPTER, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "application/json", 400, "unsupported_content"),
    ("/v1/chat/completions", {"model": ADAPTER, "messages": [{**MESSAGES[0], "foo": 1}]}, "application/json", 400,
     "unknown_parameter"),
    ("/v1/completions", json.dumps({"model": ADAPTER, "prompt": PROMPT}).encode(), "text/plain", 415,
     "unsupported_media_type"),
    ("/v1/chat/completions", b"model=good&prompt=x", "application/x-www-form-urlencoded", 415,
     "unsupported_media_type"),
    ("/v1/completions", b"", "application/json", 400, "missing_body"),
    ("/v1/completions", b"[]", "application/json", 400, "invalid_request"),
    ("/v1/completions", b'{"model": "good", "prompt": ', "application/json", 400, "invalid_json"),
]


def test_refused_requests_change_nothing(client):
    """Each refusal is a 4xx in OpenAI's shape with a message in the caller's terms; afterwards the server has
    counted no request, looked up no adapter, holds nothing, and answers as before."""
    before_text = _text(client.post("/v1/completions", json={"model": ADAPTER, "prompt": PROMPT, **GREEDY}))
    _idle(client)
    before = _counters(client)
    for route, body, content_type, status, code in BAD:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = client.post(route, content=content, headers={"content-type": content_type})
        assert r.status_code == status, (route, body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error", error
        assert error["code"] == code and not INTERNALS.search(error["message"]), error
    assert _counters(client) == before
    _idle(client)
    assert _text(client.post("/v1/completions", json={"model": ADAPTER, "prompt": PROMPT, **GREEDY})) == before_text


@pytest.mark.parametrize(
    ("route", "body", "table"),
    [
        ("/v1/completions", {"model": ADAPTER, "prompt": PROMPT}, unsupported.COMPLETIONS),
        ("/v1/chat/completions", {"model": ADAPTER, "messages": MESSAGES}, unsupported.CHAT),
    ],
    ids=["completions", "chat"],
)
def test_every_neutral_value_gives_the_answer_of_a_bare_request(client, route, body, table):
    bare = _text(client.post(route, json={**body, **GREEDY}))
    for pick in (0, -1):  # null for all, then the last neutral value of each
        neutral = {option: values[pick] for option, values in table.items()}
        assert _text(client.post(route, json={**body, **GREEDY, **neutral})) == bare, neutral


def _openai(client: TestClient) -> openai.OpenAI:
    """The official client, its HTTP routed into the in-process server."""

    def forward(request: httpx.Request) -> httpx.Response:
        headers = {k: v for k, v in request.headers.items() if k in ("content-type", "authorization", "accept")}
        r = client.request(request.method, request.url.path, content=request.content, headers=headers)
        return httpx.Response(r.status_code, headers={"content-type": r.headers["content-type"]}, content=r.content)

    http = httpx.Client(transport=httpx.MockTransport(forward), base_url="http://loraplex.test")
    return openai.OpenAI(base_url="http://loraplex.test/v1", api_key="unused", http_client=http, max_retries=0)


def test_the_openai_client_is_accepted_with_what_it_sends(client):
    oai = _openai(client)
    bare = _text(client.post("/v1/completions", json={"model": ADAPTER, "prompt": PROMPT, **GREEDY}))
    extra = {"ignore_eos": True}
    completion = oai.completions.create(
        model=ADAPTER, prompt=PROMPT, max_tokens=6, temperature=0, n=1, echo=False, logprobs=None, best_of=1,
        presence_penalty=0, frequency_penalty=0, seed=3, user="user-1", stop=None, extra_body=extra,
    )
    assert completion.choices[0].text == bare
    chunks = list(oai.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body=extra))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == bare
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6

    chat_bare = _text(client.post("/v1/chat/completions", json={"model": ADAPTER, "messages": MESSAGES, **GREEDY}))
    parts = [{"role": "user", "content": [{"type": "text", "text": MESSAGES[0]["content"]}]}]
    answer = oai.chat.completions.create(
        model=ADAPTER, messages=parts, max_completion_tokens=6, temperature=0, logprobs=False, store=False,
        metadata={"team": "a"}, response_format={"type": "text"}, extra_body=extra,
    )
    assert answer.choices[0].message.content == chat_bare
    # A conversation replayed with the answer object as the SDK returned it.
    again = oai.chat.completions.create(
        model=ADAPTER, messages=[*MESSAGES, answer.choices[0].message, {"role": "user", "content": "more"}],
        max_completion_tokens=2, temperature=0,
    )
    assert again.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("call", "code", "param", "message"),
    [
        (lambda o: o.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=2, extra_body={"foo": 1}),
         "unknown_parameter", "foo", "Unrecognized request argument supplied: foo"),
        (lambda o: o.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=2,
                                        extra_body={"use_beam_search": True}),
         "unsupported_parameter", "use_beam_search",
         "use_beam_search is not supported by this server; leave it out or set it to false"),
        (lambda o: o.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=2, logprobs=21),
         "invalid_request", "logprobs", "logprobs: must be less than or equal to 20 (got 21)"),
        (lambda o: o.chat.completions.create(model=ADAPTER, messages=MESSAGES, max_tokens=2, logit_bias={"-3": 1}),
         "invalid_logit_bias", "logit_bias", "logit_bias: '-3' is not a token id in [0, 320)"),
        (lambda o: o.chat.completions.create(
            model=ADAPTER, max_tokens=2,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]),
         "unsupported_content", "messages[0].content[0]",
         'messages[0].content[0]: content parts of type "image_url" are not supported; only text parts are'),
    ],
    ids=["unknown", "use_beam_search", "logprobs", "logit_bias", "image"],
)
def test_the_openai_client_reads_our_refusals(client, call, code, param, message):
    with pytest.raises(openai.BadRequestError) as refused:
        call(_openai(client))
    assert refused.value.status_code == 400
    assert refused.value.code == code and refused.value.param == param
    assert refused.value.body["message"] == message
