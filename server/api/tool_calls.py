"""Tool calling: ``tools`` rendered by the chat template, and the model's calls parsed into OpenAI's
``tool_calls``.

- A named ``tool_choice`` and ``"required"`` work with any model: the output is constrained (xgrammar) to the
  function's arguments, or to a JSON list of ``{"name", "parameters"}`` calls, as vLLM does it.
- ``"auto"`` (the default when tools are sent) lets the model choose. It needs a chat template that renders the
  tools and has the model answer in ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` tags (Hermes and
  Qwen templates); with another template it is a 400 that says to name a function or send ``"required"``.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Literal

from transformers import PreTrainedTokenizerBase

from server.api.errors import ApiError
from server.api.schemas import ChatCompletionRequest, ChatMessage
from server.api.structured_schemas import NamedToolChoice
from server.engine.grammar import GrammarSpec

Mode = Literal["none", "auto", "required", "named"]
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def mode(body: ChatCompletionRequest) -> Mode:
    """How the request uses its tools; 400 for a choice that names no sent tool."""
    choice = body.tool_choice
    if not body.tools:
        if choice is not None and choice != "none":
            raise ApiError(400, "tool_choice needs tools", "invalid_tool_choice", "tool_choice")
        return "none"
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in {t.function.name for t in body.tools}:
            raise ApiError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools",
                           "invalid_tool_choice", "tool_choice.function.name")
        return "named"
    return choice or "auto"


def renders_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "tools" in template


def check_template(tokenizer: PreTrainedTokenizerBase, how: Mode) -> None:
    template = getattr(tokenizer, "chat_template", None) or ""
    if how == "auto" and not (renders_tools(tokenizer) and "<tool_call>" in template):
        raise ApiError(
            400,
            'tool_choice "auto" needs a chat template that renders tools and <tool_call> tags; this model\'s does '
            'not: send tool_choice "required" or name a function',
            "invalid_tool_choice",
            "tool_choice",
        )


def constraint(body: ChatCompletionRequest, how: Mode) -> tuple[GrammarSpec, str] | None:
    """The grammar that forces the calls (named and required), else None."""
    tools = body.tools or []
    if how == "named":
        assert isinstance(body.tool_choice, NamedToolChoice)
        name = body.tool_choice.function.name
        fn = next(t.function for t in tools if t.function.name == name)
        return GrammarSpec("json", json.dumps(_parameters(fn.parameters))), f"tools[{name}].function.parameters"
    if how == "required":
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": t.function.name}, "parameters": _parameters(t.function.parameters)},
                "required": ["name", "parameters"],
            }
            for t in tools
        ]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if body.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return GrammarSpec("json", json.dumps(schema)), "tools"
    return None


def parse(text: str, how: Mode, body: ChatCompletionRequest) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished answer; the text as content when it holds no call."""
    if how == "named":
        assert isinstance(body.tool_choice, NamedToolChoice)
        return None, [call(body.tool_choice.function.name, text)]
    if how == "required":
        try:
            items = json.loads(text)
            return None, [call(item["name"], json.dumps(item["parameters"])) for item in items]
        except (ValueError, TypeError, KeyError):
            return text, []  # cut short (max_tokens): not a list of calls
    if how == "auto":
        calls, rest, end = [], [], 0
        for found in _TAGGED.finditer(text):
            try:
                item = json.loads(found.group(1))
                args = item.get("arguments", item.get("parameters", {}))
                calls.append(call(str(item["name"]), args if isinstance(args, str) else json.dumps(args)))
            except (ValueError, TypeError, KeyError, AttributeError):
                continue  # not a call: it stays in the content
            rest.append(text[end : found.start()])
            end = found.end()
        if calls:
            content = ("".join(rest) + text[end:]).strip()
            return content or None, calls[:1] if body.parallel_tool_calls is False else calls
    return text, []


def call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """The messages as chat templates read them: tool calls' arguments as objects where they parse."""
    out = []
    for m in messages:
        msg: dict = {"role": m.role, "content": m.text()}
        if m.name:
            msg["name"] = m.name
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": c.type, "function": {"name": c.function.name,
                                                          "arguments": _loads(c.function.arguments)}}
                for c in m.tool_calls
            ]
        out.append(msg)
    return out


def _parameters(schema: dict | None) -> dict:
    return schema if schema else {"type": "object"}


def _loads(arguments: str) -> object:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
