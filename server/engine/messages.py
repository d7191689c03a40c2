"""Small messages between the HTTP side and the engine thread."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from server.adapters.commands import AdapterCommand
from server.engine.logprobs import TokenLogprob
from server.engine.request import ErrorKind, FinishReason, Request


@dataclass(frozen=True)
class RequestOutput:
    """What the engine emits for a request after a step (or once, when it fails early)."""

    request_id: str
    text: str  # new text since the last output
    token_ids: tuple[int, ...]  # new tokens since the last output
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    adapter_tiers: tuple[str, ...] = ()  # on a request's first output: where each adapter was found on arrival
    logprobs: tuple[TokenLogprob, ...] = ()  # of the new tokens, when asked for (an ending EOS has none)
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # on the first output, when asked for: tokens 1..
    cumulative_logprob: float | None = None  # on the last output of a best_of candidate
    error: str | None = None
    error_kind: ErrorKind | None = None


OutputSink = Callable[[RequestOutput], None]


@dataclass(frozen=True)
class Submit:
    request: Request
    sink: OutputSink


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Wake:
    """Nothing to do but look again (an adapter finished loading)."""


@dataclass(frozen=True)
class Call:
    """Tests' and benchmarks' look at engine-owned state between two steps; operators send adapter commands."""

    fn: Callable[[], Any]
    future: Future


@dataclass(frozen=True)
class Stop:
    pass


Message = Submit | Abort | Wake | Call | Stop | AdapterCommand
