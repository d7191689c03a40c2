"""Request and response bodies at the HTTP edge (OpenAI-compatible)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from server.api import unsupported
from server.api.strict_body import StrictBody
from server.api.structured_schemas import ResponseFormat, StructuredOutputs, Tool, ToolCall, ToolChoice
from server.engine.request import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_STOP_TOKEN_IDS

MAX_ALLOWED_TOKEN_IDS = 4096

MAX_PROMPTS = 32  # prompts in one /v1/completions request
MAX_COMPOSED = 8  # adapters composed in one request (also at most the number of device slots)
MAX_WEIGHT = 100.0
MAX_MESSAGES = 512
MAX_N = 16  # choices per prompt (n, best_of)


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it contains a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]  # JSON can carry lone surrogates; nothing downstream can


class StreamOptions(StrictBody):
    UNSUPPORTED = unsupported.STREAM_OPTIONS

    include_usage: bool = False


class AdapterTerm(StrictBody):
    """One adapter of a composition: its low-rank term is multiplied by ``weight`` (negative subtracts it)."""

    name: str = Field(..., min_length=1, max_length=512)
    weight: float = Field(1.0, ge=-MAX_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False)


class GenerationFields(StrictBody):
    """What completions and chat completions share. Unknown fields are refused (400), as OpenAI does."""

    model: str = Field("", max_length=512, description="the base model's name (or ''), an adapter, or base:adapter")
    adapters: list[AdapterTerm] | None = Field(
        None,
        max_length=MAX_COMPOSED,
        description="compose several adapters in this request: y = Wx + sum_i weight_i * scale_i * B_i A_i x "
        "(then `model` must name the base model)",
    )
    max_tokens: int | None = Field(
        None, ge=1, description="default: 16 for completions, the rest of the context for chat"
    )
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="-1, 0 or None: off")
    seed: int | None = None
    stop: Text | list[Text] | None = None
    include_stop_str_in_output: bool = Field(False, description="vLLM's: a matched stop string stays in the text")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: Text | None = Field(None, description="the end user, for the caller's own records: not used")
    metadata: dict[str, Text] | None = Field(None, max_length=16, description="tags for the caller: not used")
    timeout: float | None = Field(
        None,
        gt=0,
        le=86400,
        description="seconds; past it the request is aborted (504, or an error event when streaming)",
    )
    n: int | None = Field(None, ge=1, le=MAX_N, description="choices per prompt")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    min_tokens: int | None = Field(None, ge=0, description="EOS and stop strings do not end the output before it")
    logit_bias: dict[str, float] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description="token id -> bias in [-100, 100] added to its logit"
    )
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    allowed_token_ids: list[int] | None = Field(None, min_length=1, max_length=MAX_ALLOWED_TOKEN_IDS,
                                                description="vLLM's: only these tokens may be sampled")
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="vLLM's: log-probs of the prompt")
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = Field(None, max_length=16 * 1024)
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=256)
    guided_grammar: str | None = Field(None, max_length=16 * 1024)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> GenerationFields:
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError("invalid_combination", "only allowed with stream: true",
                                      {"param": "stream_options"})
        return self

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1


class CompletionRequest(GenerationFields):
    """``POST /v1/completions``."""

    UNSUPPORTED = unsupported.COMPLETIONS

    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        ..., description=f"text, token ids, or a list of up to {MAX_PROMPTS} of either (n choices each)"
    )
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="log-probs of this many top tokens too")
    echo: bool = Field(False, description="the prompt's text before each choice's (and its log-probs)")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="candidates per prompt; the n likeliest return")

    @model_validator(mode="after")
    def _best_of_covers_n(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.choices_per_prompt:
            raise PydanticCustomError("invalid_combination", "must be at least n", {"param": "best_of"})
        if self.best_of is not None and self.best_of > self.choices_per_prompt and self.stream:
            raise PydanticCustomError("invalid_combination", "greater than n cannot stream",
                                      {"param": "best_of"})
        return self


class TextPart(StrictBody):
    """A part of a message's content; only text parts are supported."""

    type: Literal["text"]
    text: Text

    @model_validator(mode="before")
    @classmethod
    def _only_text(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if isinstance(kind, str) and kind != "text":  # image_url, input_audio, file, ...
            raise PydanticCustomError(
                unsupported.CONTENT, "content parts of type {part_type} are not supported; only text parts are",
                {"part_type": json.dumps(kind[:40])},
            )
        return data


class ChatMessage(StrictBody):
    UNSUPPORTED = unsupported.MESSAGE

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = Field(None, max_length=256)
    tool_calls: list[ToolCall] | None = Field(None, max_length=64, description="an assistant's calls, replayed")
    tool_call_id: str | None = Field(None, max_length=256, description="a tool message's answer to this call")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationFields):
    """``POST /v1/chat/completions``: the messages go through the tokenizer's chat template."""

    UNSUPPORTED = unsupported.CHAT

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    add_generation_prompt: bool = Field(True, description="end the prompt with the assistant turn's opening")
    continue_final_message: bool = Field(False, description="continue the last (assistant) message instead")
    logprobs: bool | None = Field(None, description="each output token's log-prob")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="and this many alternatives")
    tools: list[Tool] | None = Field(None, max_length=64)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call per answer")

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise PydanticCustomError("invalid_combination", "needs logprobs: true",
                                      {"param": "top_logprobs"})
        return self


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: parallel lists over the choice's tokens."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # vLLM's, when asked for


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose K/V the prefix cache held


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # vLLM's, when asked for


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """OpenAI's model object (vLLM's ``root`` and ``parent`` added). An adapter a request cannot use carries two
    more fields, ``status: "invalid"`` and ``error`` (why); other cards have neither."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loraplex"
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
