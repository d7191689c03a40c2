"""Log-probs in the response shapes clients parse: OpenAI's chat ``logprobs.content``, OpenAI's completions
``logprobs`` (parallel lists), and vLLM's ``prompt_logprobs``."""

from __future__ import annotations

from collections.abc import Sequence

from server.engine.grammar import Grammars
from server.engine.logprobs import TokenLogprob


class TokenTexts:
    """Each token's exact bytes (from the tokenizer's vocabulary) and its text (invalid UTF-8 replaced, as a
    token that splits a character decodes)."""

    def __init__(self, grammars: Grammars) -> None:
        self._grammars = grammars

    def bytes(self, token_id: int) -> bytes:
        return self._grammars.token_bytes(token_id)

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")


def chat_content(entries: Sequence[TokenLogprob], texts: TokenTexts) -> list[dict]:
    """``logprobs.content`` entries: token, logprob, bytes and ``top_logprobs``."""
    return [
        {**_chat_token(e.token_id, e.logprob, texts), "top_logprobs": [_chat_token(t, lp, texts) for t, lp in e.top]}
        for e in entries
    ]


def completion_logprobs(
    entries: Sequence[TokenLogprob | None], texts: TokenTexts, offset: int, first_token: int | None = None
) -> dict:
    """OpenAI's completions shape for ``entries`` (None: the prompt's first token, which has none; its id is
    ``first_token``). ``text_offset`` counts characters from ``offset``, the choice text's length before them."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        token_id = first_token if e is None else e.token_id
        text = texts.text(token_id) if token_id is not None else ""
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if e is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(e.logprob)
        top = {texts.text(t): lp for t, lp in e.top}
        top.setdefault(text, e.logprob)  # the chosen token is always listed, as OpenAI and vLLM do
        out["top_logprobs"].append(top)
    return out


def prompt_logprobs(entries: Sequence[TokenLogprob], texts: TokenTexts) -> list[dict | None]:
    """vLLM's shape: None for the first prompt token, then ``{token id: {logprob, rank, decoded_token}}`` with
    the prompt's token and the top alternatives."""
    out: list[dict | None] = [None]
    for e in entries:
        entry = {str(t): {"logprob": lp, "rank": rank, "decoded_token": texts.text(t)}
                 for rank, (t, lp) in enumerate(e.top, start=1)}
        entry[str(e.token_id)] = {"logprob": e.logprob, "rank": e.rank, "decoded_token": texts.text(e.token_id)}
        out.append(entry)
    return out


def _chat_token(token_id: int, logprob: float, texts: TokenTexts) -> dict:
    return {"token": texts.text(token_id), "logprob": logprob, "bytes": list(texts.bytes(token_id))}
