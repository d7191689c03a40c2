"""Bodies of ``POST /tokenize`` and ``POST /detokenize`` (vLLM's fields; unknown fields refused)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from server.api.schemas import MAX_MESSAGES, ChatMessage, Text
from server.api.strict_body import StrictBody
from server.api.unsupported import Table

# vLLM's options of the chat form that this server does not implement: only their neutral values pass.
TOKENIZE_CHAT_UNSUPPORTED: Table = {
    "add_special_tokens": (None, False),  # the chat template places the special tokens, as in chat completions
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "tools": (None, []),
    "mm_processor_kwargs": (None,),
    "media_io_kwargs": (None,),
}
MODEL_DESCRIPTION = "the base model's name (or '' or null), an adapter, or base:adapter; all share one tokenizer"


class TokenizePromptRequest(StrictBody):
    """Text, tokenized as ``/v1/completions`` tokenizes a text prompt."""

    model: str | None = Field("", max_length=512, description=MODEL_DESCRIPTION)
    prompt: Text
    add_special_tokens: bool = Field(True, description="add the tokenizer's special tokens (e.g. BOS)")
    return_token_strs: bool = Field(False, description="also return each token's string")


class TokenizeChatRequest(StrictBody):
    """Messages, rendered by the chat template and tokenized exactly as ``/v1/chat/completions`` does."""

    UNSUPPORTED = TOKENIZE_CHAT_UNSUPPORTED

    model: str | None = Field("", max_length=512, description=MODEL_DESCRIPTION)
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    add_generation_prompt: bool = Field(True, description="end with the assistant turn's opening")
    continue_final_message: bool = Field(False, description="leave the last (assistant) message open instead")
    return_token_strs: bool = Field(False, description="also return each token's string")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int = Field(description="the context limit of one request (prompt + max_tokens)")
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(StrictBody):
    model: str | None = Field("", max_length=512, description=MODEL_DESCRIPTION)
    tokens: list[int] = Field(description="token ids, each in [0, vocabulary size)")


class DetokenizeResponse(BaseModel):
    prompt: str
