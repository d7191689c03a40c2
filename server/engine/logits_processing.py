"""What changes a request's logits before its token is chosen: logit_bias, min_tokens, the repetition,
presence and frequency penalties. Each is applied to every row that asks for it with one batched operation;
rows that ask for none cost nothing.

Definitions, as clients know them elsewhere:
- ``repetition_penalty`` (transformers' and vLLM's): a token that appears in the prompt or the output has its
  logit divided by the penalty when positive, multiplied by it when negative.
- ``presence_penalty`` and ``frequency_penalty`` (OpenAI's): ``logit - frequency * count - presence * (count > 0)``,
  counting the token's occurrences in the output only.
- ``min_tokens`` (vLLM's): end-of-sequence and ``stop_token_ids`` cannot be chosen before the output has this
  many tokens.
Order (vLLM's): bias, min_tokens, repetition, then presence and frequency.
"""

from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from server.engine.request import Request


def process(logits: torch.Tensor, reqs: list[Request], eos_ids: frozenset[int]) -> None:
    """Apply, in place, what each row's request asks for; ``logits[i]`` is ``reqs[i]``'s next token's."""
    bias = [(i, t, b) for i, r in enumerate(reqs) for t, b in r.params.logit_bias]
    if bias:
        rows, toks, vals = zip(*bias, strict=True)
        values = torch.tensor(vals, dtype=logits.dtype, device=logits.device)
        logits.index_put_((_ids(rows, logits), _ids(toks, logits)), values, accumulate=True)
    banned = [
        (i, t)
        for i, r in enumerate(reqs)
        if len(r.output_ids) < r.params.min_tokens
        for t in chain(() if r.params.ignore_eos else eos_ids, r.params.stop_token_ids)
    ]
    if banned:
        rows, toks = zip(*banned, strict=True)
        logits[_ids(rows, logits), _ids(toks, logits)] = float("-inf")
    penalized = [i for i, r in enumerate(reqs) if r.params.penalized]
    if penalized:
        _penalize(logits, penalized, [reqs[i] for i in penalized])


def _penalize(logits: torch.Tensor, rows: list[int], reqs: list[Request]) -> None:
    dev, vocab = logits.device, logits.shape[-1]
    index = _ids(rows, logits)
    scores = logits.index_select(0, index)
    counts = _counts([r.output_ids for r in reqs], len(reqs), vocab, logits)
    rep = [r.params.repetition_penalty for r in reqs]
    if any(p != 1.0 for p in rep):
        seen = (counts + _counts([r.prompt_ids for r in reqs], len(reqs), vocab, logits)) > 0
        penalty = torch.tensor(rep, dtype=scores.dtype, device=dev).view(-1, 1).expand_as(scores)
        scores = torch.where(seen, torch.where(scores > 0, scores / penalty, scores * penalty), scores)
    freq = torch.tensor([r.params.frequency_penalty for r in reqs], dtype=scores.dtype, device=dev).view(-1, 1)
    pres = torch.tensor([r.params.presence_penalty for r in reqs], dtype=scores.dtype, device=dev).view(-1, 1)
    scores = scores - freq * counts - pres * (counts > 0).to(scores.dtype)
    logits.index_copy_(0, index, scores)


def _counts(seqs: list[list[int]], n: int, vocab: int, like: torch.Tensor) -> torch.Tensor:
    """``[n, vocab]`` occurrences of each token id in each sequence."""
    counts = torch.zeros(n, vocab, dtype=like.dtype, device=like.device)
    lengths = torch.tensor([len(s) for s in seqs], device=like.device)
    rows = torch.repeat_interleave(torch.arange(n, device=like.device), lengths)
    if len(rows):
        cols = _ids(list(chain.from_iterable(seqs)), like)
        counts.index_put_((rows, cols), torch.ones(len(rows), dtype=like.dtype, device=like.device), accumulate=True)
    return counts


def _ids(values, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=like.device)
