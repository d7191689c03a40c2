"""Structured outputs: grammars compiled by xgrammar, and the token masks of the requests that follow one.

A request's grammar is compiled at the HTTP edge (a bad schema or regex is the caller's 400 before anything is
queued) and its matcher travels with the request; the engine thread then owns it. Each step, every guided row
of the batch gets the bitmask of the tokens its grammar allows next, and one call masks them all; after the
step each matcher takes its sampled token. Compiled grammars are cached by xgrammar's compiler.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Literal

import torch
import xgrammar as xgr
from transformers import PreTrainedTokenizerBase

Kind = Literal["json", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match: a JSON schema (JSON text), any JSON object, a regular expression,
    one of several strings (a JSON list), or an EBNF grammar."""

    kind: Kind
    source: str = ""


class GrammarError(ValueError):
    """The grammar cannot be compiled: the caller's mistake (400)."""


class Grammars:
    """Compiles grammars for one tokenizer and the model's vocabulary; safe to call from any thread."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: frozenset[int]) -> None:
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._stop = sorted(stop_token_ids)
        self._lock = threading.Lock()
        self._compiler: xgr.GrammarCompiler | None = None
        self._bytes: list[bytes] = []

    def compiler(self) -> xgr.GrammarCompiler:
        """Built at first use (reading the vocabulary takes a fraction of a second)."""
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._stop or None
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=64 << 20)
                self._bytes = info.decoded_vocab
            return self._compiler

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for (a special token's text for a special token)."""
        self.compiler()
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    @staticmethod
    def matcher(compiled: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
        """A matcher at the grammar's start: one per request (it keeps the request's place in the grammar)."""
        return xgr.GrammarMatcher(compiled)

    def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """``spec`` compiled; :class:`GrammarError` naming what is wrong when it does not compile."""
        compiler = self.compiler()
        try:
            if spec.kind == "json":
                schema = bounded_strings(json.loads(spec.source))
                compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
            elif spec.kind == "json_object":  # any object, written compactly (free whitespace lets models loop)
                compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            elif spec.kind == "regex":
                compiled = compiler.compile_regex(spec.source)
            elif spec.kind == "choice":
                options = " | ".join(_ebnf_string(c) for c in json.loads(spec.source))
                compiled = compiler.compile_grammar(f"root ::= {options}")
            else:
                compiled = compiler.compile_grammar(spec.source)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise GrammarError(_reason(exc)) from None
        return compiled


def bounded_strings(node: Any) -> Any:
    """``node`` with each plain string of bounded length (``minLength``/``maxLength``, no pattern or format)
    written as the equivalent ``pattern``.

    xgrammar 0.2.9 compiles a length-bounded string to a rule that admits raw control characters, which JSON
    forbids (its output then fails ``json.loads``); its pattern rule excludes them (and escapes: the output
    is narrower, always valid).
    """
    if isinstance(node, list):
        return [bounded_strings(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: bounded_strings(value) for key, value in node.items()}
    bounded = "minLength" in out or "maxLength" in out
    plain = out.get("type") == "string" and not ({"pattern", "format", "enum", "const"} & out.keys())
    low, high = out.get("minLength", 0), out.get("maxLength", "")
    if plain and bounded and _count(low) and (high == "" or _count(high)):  # else the compiler refuses them
        out.pop("minLength", None)
        out.pop("maxLength", None)
        out["pattern"] = f"^[\\s\\S]{{{low},{high}}}$"
    return out


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def mask(logits: torch.Tensor, rows: list[int], matchers: list[xgr.GrammarMatcher]) -> None:
    """Set to -inf, in place, every token that row ``rows[j]``'s grammar does not allow next."""
    vocab = logits.shape[-1]
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], vocab)
    for row, matcher in zip(rows, matchers, strict=True):
        matcher.fill_next_token_bitmask(bitmask, row)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=vocab, indices=rows)


def _ebnf_string(text: str) -> str:
    """A string literal of xgrammar's EBNF: JSON's escapes, non-ASCII as \\u escapes."""
    return json.dumps(text, ensure_ascii=True)


def _reason(exc: Exception) -> str:
    """xgrammar's message without its source location prefix (``[12:00:00] /project/cpp/x.cc:94: ...``)."""
    text = str(exc).strip()
    head, sep, rest = text.partition(": ")
    if sep and (".cc:" in head or ".h:" in head):
        text = rest
    return text.splitlines()[0] if text else type(exc).__name__
