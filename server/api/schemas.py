"""Request and response bodies at the HTTP edge (OpenAI-compatible)."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from server.api import unsupported

MAX_PROMPTS = 32  # prompts in one /v1/completions request
MAX_COMPOSED = 8  # adapters composed in one request (also at most the number of device slots)
MAX_WEIGHT = 100.0
MAX_MESSAGES = 512


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it contains a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]  # JSON can carry lone surrogates; nothing downstream can


class StrictBody(BaseModel):
    """A request object: unknown keys are refused, and so are the ``UNSUPPORTED`` options set to anything but
    their neutral values (see :mod:`server.api.unsupported`)."""

    model_config = ConfigDict(extra="forbid")
    UNSUPPORTED: ClassVar[unsupported.Table] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        return unsupported.drop_neutral(data, cls.UNSUPPORTED)


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

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> GenerationFields:
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError("invalid_combination", "only allowed with stream: true",
                                      {"param": "stream_options"})
        return self


class CompletionRequest(GenerationFields):
    """``POST /v1/completions``."""

    UNSUPPORTED = unsupported.COMPLETIONS

    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        ..., description=f"text, token ids, or a list of up to {MAX_PROMPTS} of either (one choice each)"
    )


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

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: Text | None = Field(None, max_length=256)

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


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


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
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: None = None


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
