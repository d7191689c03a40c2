"""Request fields that constrain the output: OpenAI's ``response_format`` and ``tools``, vLLM's ``guided_*`` and
``structured_outputs``. :mod:`server.api.structured_output` turns them into the grammar a request follows."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from server.api.strict_body import StrictBody

MAX_TOOLS = 64
MAX_CHOICES = 256
MAX_PATTERN = 16 * 1024  # characters of a regex or grammar
FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names


class JsonSchemaFormat(StrictBody):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field("response", min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictBody):
    """``{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(StrictBody):
    """vLLM's ``structured_outputs``: exactly one of its constraints."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = Field(None, max_length=MAX_PATTERN)
    choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    grammar: str | None = Field(None, max_length=MAX_PATTERN)
    json_object: bool | None = None


class FunctionDefinition(StrictBody):
    name: str = Field(..., pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(StrictBody):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(StrictBody):
    name: str = Field(..., pattern=FUNCTION_NAME)


class NamedToolChoice(StrictBody):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(StrictBody):
    name: str
    arguments: str


class ToolCall(StrictBody):
    """An assistant message's call, as a client replays it."""

    id: str = Field(..., max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall
