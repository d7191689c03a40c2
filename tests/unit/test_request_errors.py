"""Strict request bodies and their errors, on the real schemas and error handlers (no model, no engine).

Unknown fields and known-but-unimplemented options are 400s naming them;
neutral values of those options are accepted; every validation error names the
field as a caller writes it, never pydantic's internal location; bodies that are
not a JSON object get messages a caller can act on.
"""

from __future__ import annotations

import json
import re
from typing import ClassVar

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.api import unsupported
from server.api.errors import install_error_handlers
from server.api.request_errors import request_error
from server.api.schemas import ChatCompletionRequest, CompletionRequest

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
PROMPT = {"prompt": "hi"}
ROUTES = {"/v1/completions": PROMPT, "/v1/chat/completions": CHAT}
TABLES = {"/v1/completions": unsupported.COMPLETIONS, "/v1/chat/completions": unsupported.CHAT}
NOT_NEUTRAL = {"surely": "not a neutral value"}
# What pydantic's own locations and messages look like: none of it may reach a caller.
INTERNALS = re.compile(r"function-after|list\[|TextPart|ChatMessage|body\.|Input should|Field required|[a-z]\.\d")


@pytest.fixture(scope="module")
def client():
    app = FastAPI()
    install_error_handlers(app, before_validation=lambda _: None)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> dict:
        return body.model_dump()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> dict:
        return body.model_dump()

    with TestClient(app) as c:
        yield c


def refused(client: TestClient, route: str, body: object = None, status: int = 400, **kw) -> dict:
    if body is not None:  # ASCII-escaped JSON: lone surrogates travel as escapes, as JSON clients send them
        kw = {"content": json.dumps(body).encode(), "headers": {"content-type": "application/json"}}
    r = client.post(route, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error", error
    assert not INTERNALS.search(error["message"]), error
    return error


# --------------------------------------------------------------------------- unknown fields


@pytest.mark.parametrize(
    ("route", "extra", "path"),
    [
        ("/v1/completions", {"foo": 1}, "foo"),
        ("/v1/completions", {"max_token": 5}, "max_token"),  # a typo is not silently the default
        ("/v1/chat/completions", {"foo": None}, "foo"),  # even null
        ("/v1/chat/completions", {"suffix": "x"}, "suffix"),  # a completions option, unknown to chat
        ("/v1/chat/completions", {"best_of": 1}, "best_of"),
        ("/v1/completions", {"tools": []}, "tools"),  # a chat option, unknown to completions
        ("/v1/completions", {"max_completion_tokens": 4}, "max_completion_tokens"),
        ("/v1/completions", {"my key": 1}, '"my key"'),
        ("/v1/completions", {"stream": True, "stream_options": {"include_usage": True, "foo": 1}},
         "stream_options.foo"),
        ("/v1/completions", {"adapters": [{"name": "a"}, {"name": "b", "scale": 2}]}, "adapters[1].scale"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "foo": 1}]}, "messages[0].foo"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "y": 1}]}]},
         "messages[0].content[0].y"),
    ],
)
def test_unknown_fields_are_refused_naming_them(client, route, extra, path):
    error = refused(client, route, {**ROUTES[route], **extra})
    assert error["message"] == f"Unrecognized request argument supplied: {path}", error
    assert error["param"] == path and error["code"] == "unknown_parameter", error


def test_an_unknown_field_is_reported_before_what_it_left_missing(client):
    error = refused(client, "/v1/completions", {"prompts": "hi", "max_tokens": -1})
    assert error["message"] == "Unrecognized request argument supplied: prompts", error


# --------------------------------------------------------------------------- known options not implemented


def _cases() -> list[tuple[str, str]]:
    return [(route, option) for route, table in TABLES.items() for option in table]


@pytest.mark.parametrize(("route", "option"), _cases(), ids=[f"{r.split('/')[-1]}-{o}" for r, o in _cases()])
def test_every_unimplemented_option_set_to_something_is_refused(client, route, option):
    error = refused(client, route, {**ROUTES[route], option: NOT_NEUTRAL})
    neutral = TABLES[route][option]
    assert error["message"] == f"{option} is not supported by this server; {unsupported.accepted(neutral)}", error
    assert error["param"] == option and error["code"] == "unsupported_parameter", error


@pytest.mark.parametrize(("route", "option"), _cases(), ids=[f"{r.split('/')[-1]}-{o}" for r, o in _cases()])
def test_every_unimplemented_option_at_a_neutral_value_is_accepted(client, route, option):
    for value in TABLES[route][option]:
        r = client.post(route, json={**ROUTES[route], option: value})
        assert r.status_code == 200, (value, r.text)
        assert option not in r.json()


@pytest.mark.parametrize(
    ("route", "option", "value", "accepted"),
    [
        ("/v1/completions", "use_beam_search", True, "leave it out or set it to false"),
        ("/v1/completions", "bad_words", ["x"], "leave it out or set it to []"),
        ("/v1/completions", "suffix", "x", 'leave it out or set it to ""'),
        ("/v1/chat/completions", "length_penalty", 2, "leave it out or set it to 1"),
        ("/v1/chat/completions", "guided_decoding_backend", "outlines",
         'leave it out or set it to "xgrammar" or "auto"'),
        ("/v1/chat/completions", "guided_whitespace_pattern", " ", "leave it out"),
        ("/v1/chat/completions", "store", True, "leave it out or set it to false"),
    ],
)
def test_unimplemented_options_say_what_is_accepted(client, route, option, value, accepted):
    error = refused(client, route, {**ROUTES[route], option: value})
    assert error["message"].startswith(f"{option} is not supported by this server; "), error
    assert accepted in error["message"], error


def test_replayed_assistant_messages_are_accepted_with_their_tool_calls(client):
    """A client that appends the previous answer as it came back sends its tool fields along; a call without its
    function is refused naming it."""
    replay = {"role": "assistant", "content": "x", "tool_calls": [], "refusal": None, "annotations": [], "audio": None}
    r = client.post("/v1/chat/completions", json={"messages": [CHAT["messages"][0], replay]})
    assert r.status_code == 200, r.text
    called = {**replay, "content": None,
              "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    answer = {"role": "tool", "tool_call_id": "call_1", "content": "42"}
    r = client.post("/v1/chat/completions", json={"messages": [CHAT["messages"][0], called, answer]})
    assert r.status_code == 200, r.text
    broken = {**replay, "tool_calls": [{"id": "call_1", "type": "function"}]}
    error = refused(client, "/v1/chat/completions", {"messages": [CHAT["messages"][0], broken]})
    assert error["param"] == "messages[1].tool_calls[0].function", error


def test_implementing_an_option_is_removing_it_from_its_table():
    """The mechanism later issues use: drop the entry, declare the field."""

    class WithSuffix(CompletionRequest):
        UNSUPPORTED: ClassVar[unsupported.Table] = {
            k: v for k, v in unsupported.COMPLETIONS.items() if k != "suffix"
        }
        suffix: str = ""

    assert WithSuffix.model_validate({"prompt": "x", "suffix": "y"}).suffix == "y"
    with pytest.raises(ValueError, match="bad_words"):
        WithSuffix.model_validate({"prompt": "x", "bad_words": ["z"]})


def test_accepted_fields_a_client_sends_are_kept(client):
    body = {**PROMPT, "user": "u-1", "seed": 7, "metadata": {"team": "a"}, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": False}, "n": 1, "echo": False}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["user"] == "u-1" and r.json()["seed"] == 7 and r.json()["stream_options"] == {"include_usage": True}


# --------------------------------------------------------------------------- content parts


@pytest.mark.parametrize("kind", ["image_url", "input_audio", "file", "video_url", "made_up"])
def test_content_parts_other_than_text_are_refused_naming_their_type(client, kind):
    parts = [{"type": "text", "text": "look:"}, {"type": kind, kind: {"url": "https://example.com/x"}}]
    error = refused(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": parts}]})
    assert error["message"] == (
        f'messages[0].content[1]: content parts of type "{kind}" are not supported; only text parts are'
    ), error
    assert error["param"] == "messages[0].content[1]" and error["code"] == "unsupported_content", error


def test_text_parts_are_accepted(client):
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}]})
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- validation errors in user terms


@pytest.mark.parametrize(
    ("route", "body", "message", "param"),
    [
        ("/v1/completions", {"prompt": 5},
         "prompt: must be a string, a list of strings, a list of integers or a list of lists of integers (got 5)",
         "prompt"),
        ("/v1/completions", {"prompt": [[1, "a"]]},
         'prompt[0][1]: must be a valid integer, unable to parse string as an integer (got "a")', "prompt[0][1]"),
        ("/v1/completions", {"prompt": ["ok", "\ud800"]},
         "prompt[1]: text must be valid Unicode (it contains a lone surrogate)", "prompt[1]"),
        ("/v1/completions", {"prompt": "\ud800"},
         "prompt: text must be valid Unicode (it contains a lone surrogate)", "prompt"),
        ("/v1/completions", {"prompt": "x", "stop": 5}, "stop: must be a string or a list of strings (got 5)", "stop"),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1},
         "max_tokens: must be greater than or equal to 1 (got -1)", "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"},
         'temperature: must be a valid number, unable to parse string as a number (got "hot")', "temperature"),
        ("/v1/completions", {}, "prompt is required", "prompt"),
        ("/v1/completions", {"prompt": "x", "adapters": [{"name": "a", "weight": 1e9}]},
         "adapters[0].weight: must be less than or equal to 100 (got 1000000000.0)", "adapters[0].weight"),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}},
         "stream_options: only allowed with stream: true", "stream_options"),
        ("/v1/completions", {"prompt": "x", "metadata": {"team": 1}}, "metadata.team: must be a valid string (got 1)",
         "metadata.team"),
        ("/v1/completions", {"prompt": "x", "metadata": {"Team": 1}}, "metadata.Team: must be a valid string (got 1)",
         "metadata.Team"),  # a caller's key, not a union alternative
        ("/v1/completions", {"prompt": "x", "metadata": {"my-key": 1}},
         'metadata["my-key"]: must be a valid string (got 1)', 'metadata["my-key"]'),
        ("/v1/chat/completions", {"messages": "hi"}, 'messages: must be a valid list (got "hi")', "messages"),
        ("/v1/chat/completions", {"messages": []}, "messages: list should have at least 1 item, not 0 (got an array)",
         "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "function", "content": "x"}]},
         "messages[0].role: must be 'system', 'developer', 'user', 'assistant' or 'tool' (got \"function\")",
         "messages[0].role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
         "top_logprobs: must be less than or equal to 20 (got 21)", "top_logprobs"),
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs: must be less than or equal to 20 (got 21)",
         "logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
         "top_logprobs: needs logprobs: true", "top_logprobs"),
        ("/v1/completions", {"prompt": "x", "n": 3, "best_of": 2}, "best_of: must be at least n", "best_of"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 17},
         "n: must be less than or equal to 16 (got 17)", "n"),
        ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5},
         "presence_penalty: must be less than or equal to 2 (got 2.5)", "presence_penalty"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "response_format": {"type": "xml"}},
         "response_format.type: must be 'text', 'json_object' or 'json_schema' (got \"xml\")", "response_format.type"),
        ("/v1/chat/completions", {"messages": [{"content": "x"}]}, "messages[0].role is required", "messages[0].role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]},
         "messages[0].content: must be a string or a list of objects (got 7)", "messages[0].content"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
         "messages[0].content[0].text is required", "messages[0].content[0].text"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": 5, "text": "x"}]}]},
         "messages[0].content[0].type: must be 'text' (got 5)", "messages[0].content[0].type"),
    ],
)
def test_validation_errors_name_the_field_as_a_caller_writes_it(client, route, body, message, param):
    error = refused(client, route, body)
    assert error["message"] == message, error
    assert error["param"] == param and error["code"] == "invalid_request", error


# --------------------------------------------------------------------------- bodies that are not a JSON object


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize(
    ("headers", "shown"),
    [
        ({"content-type": "text/plain"}, "(got 'text/plain')"),
        ({"content-type": "application/x-www-form-urlencoded"}, "(got 'application/x-www-form-urlencoded')"),
        ({}, "(the request has no Content-Type header)"),
    ],
    ids=["text", "form", "none"],
)
def test_a_body_without_a_json_content_type_is_415(client, route, headers, shown):
    error = refused(client, route, status=415, content=b'{"prompt": "hi"}', headers=headers)
    assert error["message"] == f"the body must be JSON sent with Content-Type: application/json {shown}", error
    assert error["code"] == "unsupported_media_type", error


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize(
    ("content", "message", "code"),
    [
        (b"", "the request body is empty: send a JSON object (Content-Type: application/json)", "missing_body"),
        (b"[1, 2]", "the request body must be a JSON object, got an array", "invalid_request"),
        (b'"hi"', "the request body must be a JSON object, got a string", "invalid_request"),
        (b"null", "the request body must be a JSON object, got null", "invalid_request"),
        (b'{"prompt": "x", "max_tokens": 2', "the body is not valid JSON: Expecting ',' delimiter (at character 31)",
         "invalid_json"),
        (b'{"prompt": "\x80"}', "the body is not valid JSON (it must be UTF-8 text)", "invalid_json"),
    ],
    ids=["empty", "array", "string", "null", "truncated", "not-utf8"],
)
def test_a_body_that_is_not_a_json_object_gets_a_message_to_act_on(client, route, content, message, code):
    error = refused(client, route, content=content, headers={"content-type": "application/json"})
    assert error["message"] == message and error["code"] == code and error["param"] is None, error


def test_errors_outside_the_body_say_where():
    problem = request_error(
        [{"type": "bool_parsing", "loc": ("query", "dry_run"), "msg": "Input should be a valid boolean", "input": "x"}],
        None, None,
    )
    assert problem == (400, "query parameter dry_run: must be a valid boolean", "invalid_request", "dry_run")
