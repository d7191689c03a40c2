"""Request and response bodies at the HTTP edge (OpenAI-compatible)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

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


class StreamOptions(BaseModel):
    include_usage: bool = False


class AdapterTerm(BaseModel):
    """One adapter of a composition: its low-rank term is multiplied by ``weight`` (negative subtracts it)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=512)
    weight: float = Field(1.0, ge=-MAX_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False)


class GenerationFields(BaseModel):
    """What completions and chat completions share. Unknown fields are ignored, as OpenAI clients send many."""

    model_config = ConfigDict(extra="ignore")

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
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    ignore_eos: bool = False
    user: Text | None = None
    presence_penalty: float | None = Field(None, description="not supported: absent or 0")
    frequency_penalty: float | None = Field(None, description="not supported: absent or 0")
    logit_bias: dict[str, float] | None = Field(None, description="not supported: absent or empty")
    response_format: dict | None = Field(None, description="only {'type': 'text'}")
    timeout: float | None = Field(
        None,
        gt=0,
        le=86400,
        description="seconds; past it the request is aborted (504, or an error event when streaming)",
    )


class CompletionRequest(GenerationFields):
    """``POST /v1/completions``."""

    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        ..., description=f"text, token ids, or a list of up to {MAX_PROMPTS} of either (one choice each)"
    )
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

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

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    logprobs: Literal[False] | None = None
    tools: list[dict] | None = Field(None, description="not supported: must be absent or empty")
    add_generation_prompt: bool = Field(True, description="end the prompt with the assistant turn's opening")
    continue_final_message: bool = Field(False, description="continue the last (assistant) message instead")


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


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
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loraplex"
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
