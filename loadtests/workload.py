"""A seeded workload plan: which adapter each request names, when it is sent, how long its prompt and output are.

Pure: no I/O except ``load_prompts``, which reads a JSONL file into samples the plan draws from. Each aspect
(arrivals, adapter choice, lengths) has its own random stream derived from the seed, so changing the popularity
leaves the arrival times and lengths of the same seed unchanged, and sweeps compare like with like.

Popularity, as in S-LoRA: adapter index = floor(n * X) with X ~ power(alpha), density alpha * x**(alpha - 1) on
[0, 1]; alpha = 1 is uniform, a smaller alpha piles requests onto the low indices. The alternative is a bounded
Zipf law, P(i) proportional to 1 / (i + 1)**s over the n adapters. Arrivals are Gamma-distributed gaps with
coefficient of variation ``cv`` at ``rate`` requests per second (cv = 1 is Poisson; shape = 1 / cv**2,
scale = 1 / (rate * shape)); an infinite rate sends everything at once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Common English words, most of them one token in a BPE vocabulary: prompt length in words ~ length in tokens.
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his her they this have are not but had which one "
    "you were all their there been has when who will more no if out so said what up its about into than them "
    "can only other new some time could these two may then first any like now people my over such our man me "
    "even most made after also did many before must through back years where much your way well down should "
    "because each just those how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old year off come "
    "since against go came right used take three"
)
WORDS = tuple(_WORD_TEXT.split())

_ARRIVALS, _ADAPTERS, _BASE, _LENGTHS, _WORDS = range(5)


@dataclass(frozen=True)
class PromptSample:
    """One prompt from a file, with the output length it asks for."""

    prompt: str
    max_tokens: int


@dataclass(frozen=True)
class WorkloadSpec:
    """What to send. At least one of ``num_requests`` and ``duration`` bounds the plan."""

    num_adapters: int = 8  # adapters named f"{adapter_prefix}{i}", i in 0..n-1
    adapter_prefix: str = "lora-"
    popularity: str = "power"  # "power" (S-LoRA, exponent alpha) or "zipf" (exponent zipf_s)
    alpha: float = 1.0  # power law exponent; 1 = uniform, smaller = skewed toward low indices
    zipf_s: float = 1.0  # Zipf exponent
    base_share: float = 0.0  # probability that a request names no adapter
    rate: float = 4.0  # requests per second; math.inf = all at once
    cv: float = 1.0  # coefficient of variation of the inter-arrival gaps; 1 = Poisson
    num_requests: int | None = 100
    duration: float | None = None  # seconds; arrivals at or past it are not planned
    prompt_len: tuple[int, int] = (32, 64)  # words, inclusive range
    output_len: tuple[int, int] = (32, 64)  # max_tokens, inclusive range
    prompts: tuple[PromptSample, ...] | None = None  # when set, drawn from instead of the two ranges
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests is None and self.duration is None:
            raise ValueError("bound the workload by num_requests, duration, or both")
        if self.num_requests is not None and self.num_requests < 0:
            raise ValueError("num_requests must be >= 0")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("duration must be > 0")
        if self.num_adapters < 0:
            raise ValueError("num_adapters must be >= 0")
        if self.popularity not in ("power", "zipf"):
            raise ValueError(f"popularity must be 'power' or 'zipf', not {self.popularity!r}")
        if self.alpha <= 0 or self.zipf_s <= 0:
            raise ValueError("alpha and zipf_s must be > 0")
        if not 0.0 <= self.base_share <= 1.0:
            raise ValueError("base_share must be in [0, 1]")
        if self.num_adapters == 0 and self.base_share < 1.0:
            raise ValueError("with no adapters every request is base-only: set base_share=1")
        if not self.rate > 0:
            raise ValueError("rate must be > 0")
        if math.isinf(self.rate) and self.num_requests is None:
            raise ValueError("an infinite rate needs num_requests")
        if self.cv <= 0:
            raise ValueError("cv must be > 0")
        for name, (lo, hi) in (("prompt_len", self.prompt_len), ("output_len", self.output_len)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be a range 1 <= lo <= hi, not {(lo, hi)}")
        if self.prompts is not None and not self.prompts:
            raise ValueError("prompts is empty")

    @property
    def adapter_names(self) -> list[str]:
        return [f"{self.adapter_prefix}{i}" for i in range(self.num_adapters)]


@dataclass(frozen=True)
class PlannedRequest:
    """One request of the plan. ``cold``: the first request of the plan that names this adapter."""

    index: int
    at: float  # seconds after the start of the run
    adapter: str | None  # None = base model only
    prompt: str
    max_tokens: int
    cold: bool


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def arrival_times(rate: float, cv: float, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` send times from 0: the first at 0, then Gamma gaps of mean 1/rate and coefficient of variation cv."""
    if math.isinf(rate):
        return np.zeros(count)
    shape = 1.0 / cv**2
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=max(count - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)])[:count]


def adapter_indices(spec: WorkloadSpec, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` adapter indices in [0, num_adapters) under the spec's popularity law."""
    n = spec.num_adapters
    if spec.popularity == "power":
        x = rng.power(spec.alpha, size=count)
        return np.minimum(np.floor(n * x).astype(np.int64), n - 1)
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** spec.zipf_s
    return rng.choice(n, size=count, p=weights / weights.sum())


def _count(spec: WorkloadSpec) -> int:
    """How many requests to draw: the request bound, or enough arrivals to pass the duration."""
    if spec.num_requests is not None:
        return spec.num_requests
    assert spec.duration is not None  # __post_init__ guarantees one bound
    count = int(spec.duration * spec.rate * 1.5) + 16
    while arrival_times(spec.rate, spec.cv, count, _rng(spec.seed, _ARRIVALS))[-1] < spec.duration:
        count *= 2
    return count


def build_plan(spec: WorkloadSpec) -> list[PlannedRequest]:
    """The requests to send, in send order; the same spec always gives the same plan."""
    count = _count(spec)
    times = arrival_times(spec.rate, spec.cv, count, _rng(spec.seed, _ARRIVALS))
    if spec.duration is not None:
        count = int(np.searchsorted(times, spec.duration, side="left"))
        times = times[:count]
    base = _rng(spec.seed, _BASE).random(count) < spec.base_share
    indices = adapter_indices(spec, count, _rng(spec.seed, _ADAPTERS)) if spec.num_adapters else np.zeros(count)
    lengths = _rng(spec.seed, _LENGTHS)
    words = _rng(spec.seed, _WORDS)
    names = spec.adapter_names
    seen: set[str] = set()
    plan = []
    for i in range(count):
        adapter = None if base[i] else names[int(indices[i])]
        if spec.prompts is not None:
            sample = spec.prompts[int(lengths.integers(len(spec.prompts)))]
            prompt, max_tokens = sample.prompt, sample.max_tokens
        else:
            n_words = int(lengths.integers(spec.prompt_len[0], spec.prompt_len[1] + 1))
            max_tokens = int(lengths.integers(spec.output_len[0], spec.output_len[1] + 1))
            prompt = " ".join(words.choice(WORDS, size=n_words))
        cold = adapter is not None and adapter not in seen
        if adapter is not None:
            seen.add(adapter)
        plan.append(PlannedRequest(i, float(times[i]), adapter, prompt, max_tokens, cold))
    return plan


def load_prompts(path: Path) -> tuple[PromptSample, ...]:
    """Read a JSONL file of ``{"prompt": str, "max_tokens": int}`` objects, one a line (blank lines skipped)."""
    samples = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, max_tokens = row["prompt"], row["max_tokens"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{lineno}: expected {{'prompt': str, 'max_tokens': int}}: {exc}") from exc
        if not isinstance(prompt, str) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"{path}:{lineno}: prompt must be a string and max_tokens an integer >= 1")
        samples.append(PromptSample(prompt, max_tokens))
    if not samples:
        raise ValueError(f"{path}: no prompts")
    return tuple(samples)
