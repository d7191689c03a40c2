"""Incremental detokenization with stop strings that never leak into the output."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_CONTEXT_TOKENS = 5  # prompt tokens decoded before the output so word boundaries come out right


class Detokenizer:
    """Turns a request's sampled tokens into text deltas.

    Text that might be the beginning of a stop string is held back until it is
    known not to be one; a matched stop string and everything after it are cut.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: list[int],
        stop: tuple[str, ...],
        keep_stop: bool = False,
    ) -> None:
        """``keep_stop``: a matched stop string stays at the end of the text (vLLM's
        ``include_stop_str_in_output``); what follows it is cut either way."""
        self._tok = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = stop
        self._keep_stop = keep_stop
        self._longest_stop = max((len(s) for s in stop), default=0)
        self.text = ""  # all output text so far (cut at a stop string)
        self._emitted = 0
        self.stopped = False

    def push(self, token_id: int, check_stop: bool = True) -> None:
        """Add one sampled token; sets ``stopped`` when a stop string appears in the text it adds (not looked for
        when ``check_stop`` is false: before ``min_tokens``)."""
        self._ids.append(token_id)
        self._decode(final=False, check_stop=check_stop)

    def _decode(self, final: bool, check_stop: bool = True) -> None:
        if self._read_offset >= len(self._ids):
            return
        prefix = self._tok.decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = self._tok.decode(self._ids[self._prefix_offset :], skip_special_tokens=True)
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return  # an incomplete character: wait for more tokens (at the end, emit it as decoded)
        before = len(self.text)
        self.text += full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if self._stop and check_stop:
            window = max(0, before - self._longest_stop + 1)
            hits = [(i, len(s)) for i, s in ((self.text.find(s, window), s) for s in self._stop) if i >= 0]
            if hits:
                at, length = min(hits)
                self.text = self.text[: at + length if self._keep_stop else at]
                self.stopped = True

    def delta(self, final: bool) -> str:
        """Text not emitted yet; unless ``final``, minus a tail that could start a stop string."""
        if final and not self.stopped:
            self._decode(final=True)
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._held_back()
        if end <= self._emitted:
            return ""
        out = self.text[self._emitted : end]
        self._emitted = end
        return out

    def _held_back(self) -> int:
        tail = self.text[-self._longest_stop :] if self._longest_stop else ""
        for n in range(len(tail), 0, -1):
            suffix = tail[-n:]
            if any(s.startswith(suffix) for s in self._stop):
                return n
        return 0
