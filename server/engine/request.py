"""One state object per request, owned by the engine thread."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any

from adapters_store.backend import StoredAdapter
from server.adapters.selection import Selection
from server.engine.logprobs import TokenLogprob

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
GREEDY_BELOW = 1e-5  # temperatures this small sample greedily (dividing by them overflows)
MAX_SEED = 2**63 - 1
MAX_LOGPROBS = 20  # alternatives per position in logprobs and prompt_logprobs (OpenAI's top_logprobs limit)
MAX_LOGIT_BIAS = 300  # entries of logit_bias
MAX_STOP_TOKEN_IDS = 64


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # client gone, timeout, shutdown
    ERROR = "error"  # e.g. the adapter failed to load


class ErrorKind(str, enum.Enum):
    """Why a request failed, which the HTTP side maps to a status code."""

    INVALID = "invalid_request"  # the request itself (400)
    ADAPTER = "adapter_failed"  # its adapter cannot be loaded (400)
    UNAVAILABLE = "adapter_unavailable"  # no slot or load within the wait bound (503, retry later)
    INTERNAL = "internal_error"  # the server's fault, e.g. a failed step (500)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; temperature 0 is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    include_stop_str: bool = False  # a matched stop string stays in the output
    ignore_eos: bool = False
    min_p: float = 0.0  # drop tokens less likely than min_p times the likeliest (after temperature)
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from each token already in the output
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # transformers' and vLLM's: divides (or multiplies) prompt and output tokens
    min_tokens: int = 0  # EOS, stop_token_ids and stop strings do not end the request before this many tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    stop_token_ids: tuple[int, ...] = ()  # sampling one ends the request (it stays in the output)
    allowed_token_ids: tuple[int, ...] | None = None  # vLLM's: only these may be sampled (None: any)
    logprobs: int | None = None  # each output token's log-prob and this many top alternatives (None: off)
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (None: off)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not (0.0 <= self.temperature <= 100.0) or math.isnan(self.temperature):
            raise ValueError("temperature must be between 0 and 100")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.seed is not None and not (0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be between 0 and {MAX_SEED}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s or len(s) > MAX_STOP_LENGTH for s in self.stop):
            raise ValueError(f"stop strings must be 1 to {MAX_STOP_LENGTH} characters")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError("repetition_penalty must be in (0, 10]")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be between 0 and max_tokens ({self.max_tokens})")
        if len(self.logit_bias) > MAX_LOGIT_BIAS or any(not -100.0 <= b <= 100.0 for _, b in self.logit_bias):
            raise ValueError(f"logit_bias takes at most {MAX_LOGIT_BIAS} entries with biases in [-100, 100]")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids must list at least one token")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and not 0 <= n <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be between 0 and {MAX_LOGPROBS}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def filtered(self) -> bool:
        """A sampled row that narrows its distribution before the draw."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


@dataclass
class Request:
    """A completion request as the engine tracks it."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    selection: Selection = field(default_factory=Selection)  # the base model, one adapter or a weighted sum
    arrival: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)  # while running: its KV block table (shared prefix first)
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of its first full blocks
    kv_salt: bytes = b""  # what computed its K/V (the keys' salt): its selection, and the rope table with longrope
    cached_tokens: int | None = None  # prompt tokens found in the prefix cache when it was first admitted
    preemptions: int = 0
    slots: tuple[int, ...] = ()  # while running: each term's device slot, in the selection's order
    tiers: tuple[str, ...] = ()  # where each term's adapter was found when the request arrived
    finish_reason: FinishReason | None = None
    error: str | None = None
    error_kind: ErrorKind | None = None
    adapter_wait_since: float | None = None  # when it first waited for its adapter (load or slot)
    admitted_at: float | None = None  # monotonic times, for the latency metrics
    first_token_at: float | None = None
    last_token_at: float | None = None
    grammar: Any = None  # an xgrammar matcher when the output must follow a grammar (the engine thread's once queued)
    follows: Request | None = None  # a sibling of the same prompt (n > 1): admitted once its prompt blocks are cached
    track_logprob: bool = False  # best_of: the sum of its tokens' log-probs ranks it among its siblings
    cumulative_logprob: float = 0.0
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # of prompt tokens 1.. as computed

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("the prompt is empty")

    @property
    def wants_logprobs(self) -> bool:
        return self.params.logprobs is not None or self.track_logprob

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt log-probs asked for and not all computed yet: every prompt token's logits are needed."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids) - 1

    @property
    def adapters(self) -> tuple[StoredAdapter, ...]:
        """Every adapter the request needs resident."""
        return self.selection.adapters

    @property
    def lora_terms(self) -> tuple[tuple[int, float], ...]:
        """(slot, weight) of each term while running: what the runner hands the LoRA op."""
        return tuple(zip(self.slots, self.selection.weights, strict=True))

    @property
    def sort_slot(self) -> int:
        """Requests with equal keys run next to each other (runs of one adapter for the LoRA op)."""
        return self.slots[0] if self.selection.single is not None else -1

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        """Tokens to compute before the next sample: the prompt's, or all of them again after :meth:`recompute`."""
        return self.num_computed < len(self.prompt_ids) or self.num_computed < self.num_tokens - 1

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens

    def next_tokens(self, budget: int) -> list[int]:
        """Tokens to feed next: a chunk of at most ``budget`` (of the prompt, or of prompt and outputs when
        recomputing), or the last sampled token."""
        if self.in_prefill:
            start, end, n_prompt = self.num_computed, self.num_computed + budget, len(self.prompt_ids)
            ids = self.prompt_ids[start:end]
            if end > n_prompt:
                ids = ids + self.output_ids[max(0, start - n_prompt) : end - n_prompt]
            return ids
        return [self.output_ids[-1]]

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids
