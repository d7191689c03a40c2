"""Options of OpenAI's and vLLM's request bodies that this server knows but does not implement.

Each table maps an option to its neutral values, the ones that ask for nothing
beyond what the server does: a request may send those (clients often send
defaults), and they are dropped before validation. Any other value is a 400
naming the option and what is accepted, never silently ignored. An option in
no table and not a field of the schema is unknown (400 "Unrecognized request
argument supplied"). To implement an option: delete its line here and declare
it as a field in :mod:`server.api.schemas`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic_core import PydanticCustomError

UNSUPPORTED = "unsupported_parameter"  # pydantic error types; server/api/request_errors.py words them
CONTENT = "unsupported_content"  # a chat content part other than text (image_url, input_audio, file, ...)

Table = Mapping[str, tuple]

# Both /v1/completions and /v1/chat/completions.
GENERATION: Table = {
    "use_beam_search": (None, False),
    "length_penalty": (None, 1),
    "bad_words": (None, []),
    "skip_special_tokens": (None, True),  # the detokenizer always skips them
    "truncate_prompt_tokens": (None,),
    "guided_decoding_backend": (None, "xgrammar", "auto"),  # xgrammar is the one engine
    "guided_whitespace_pattern": (None,),
    "logits_processors": (None,),
    "return_tokens_as_token_ids": (None, False),
    "priority": (None, 0),
    "store": (None, False),  # completions are not stored
    "service_tier": (None, "auto", "default"),
}

COMPLETIONS: Table = {
    **GENERATION,
    "suffix": (None, ""),
}

CHAT: Table = {
    **GENERATION,
    "functions": (None, []),
    "function_call": (None, "none"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "documents": (None, []),
}

# One entry of ``messages``: what an assistant's message carries back when a client replays a conversation.
MESSAGE: Table = {
    "function_call": (None,),
    "refusal": (None,),
    "audio": (None,),
    "annotations": (None, []),
}

STREAM_OPTIONS: Table = {
    "continuous_usage_stats": (None, False),
}


def drop_neutral(data: Any, table: Table) -> Any:
    """``data`` (a request object as sent) without the table's options at neutral values.

    Raises an ``unsupported_parameter`` error naming the first option set to anything else.
    """
    if not isinstance(data, dict):
        return data  # not an object: the schema's own validation says so
    for name, value in data.items():
        neutral = table.get(name)
        if neutral is not None and not any(_same(value, n) for n in neutral):
            raise PydanticCustomError(
                UNSUPPORTED, "{param} is not supported by this server; {accepted}",
                {"param": name, "accepted": accepted(neutral)},
            )
    return {k: v for k, v in data.items() if k not in table}


def accepted(neutral: tuple) -> str:
    """What the caller may send instead: ``(None, 1)`` -> "leave it out or set it to 1"."""
    values = [json.dumps(v) for v in neutral if v is not None]
    return "leave it out" + (" or set it to " + " or ".join(values) if values else "")


def _same(value: Any, neutral: Any) -> bool:
    """Equal as JSON values: ``true`` is not ``1``, ``0.0`` is ``0``."""
    return isinstance(value, bool) == isinstance(neutral, bool) and value == neutral
