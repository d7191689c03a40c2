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
- ``allowed_token_ids`` (vLLM's): every other token is set to -inf.
Order (vLLM's): bias, min_tokens, allowed tokens, repetition, then presence and frequency.
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
    allowed = [(i, r.params.allowed_token_ids) for i, r in enumerate(reqs) if r.params.allowed_token_ids]
    if allowed:
        rows = _ids([i for i, _ in allowed], logits)
        keep = torch.full((len(allowed), logits.shape[-1]), float("-inf"), dtype=logits.dtype, device=logits.device)
        at = [(j, t) for j, (_, ids) in enumerate(allowed) for t in ids]
        keep[_ids([j for j, _ in at], logits), _ids([t for _, t in at], logits)] = 0.0
        logits.index_add_(0, rows, keep)
    penalized = [i for i, r in enumerate(reqs) if r.params.penalized]
    if penalized:
        _penalize(logits, penalized, [reqs[i] for i in penalized])


def _penalize(logits: torch.Tensor, rows: list[int], reqs: list[Request]) -> None:
    """Only the logits of tokens a row has seen change, so only those are touched: flat indices
    ``row * vocab + token``, deduplicated (and counted) by one ``unique`` per kind, for all rows at once."""
    dev, dtype, vocab = logits.device, logits.dtype, logits.shape[-1]
    flat = logits.view(-1)
    rep = [r.params.repetition_penalty for r in reqs]
    if any(p != 1.0 for p in rep):
        seen = torch.unique(_keys(rows, [r.prompt_ids + r.output_ids for r in reqs], vocab, dev))
        penalty = _row_values(rep, seen, rows, vocab, dtype)
        values = flat[seen]
        flat[seen] = torch.where(values > 0, values / penalty, values * penalty)
    if any(r.params.presence_penalty or r.params.frequency_penalty for r in reqs):
        keys, counts = torch.unique(_keys(rows, [r.output_ids for r in reqs], vocab, dev), return_counts=True)
        if len(keys):
            freq = _row_values([r.params.frequency_penalty for r in reqs], keys, rows, vocab, dtype)
            pres = _row_values([r.params.presence_penalty for r in reqs], keys, rows, vocab, dtype)
            flat[keys] -= freq * counts.to(dtype) + pres


def _keys(rows: list[int], seqs: list[list[int]], vocab: int, dev: torch.device) -> torch.Tensor:
    """``row * vocab + token`` for every token of each row's sequence."""
    lengths = torch.tensor([len(s) for s in seqs], device=dev)
    base = torch.repeat_interleave(torch.tensor(rows, dtype=torch.int64, device=dev) * vocab, lengths)
    return base + torch.tensor(list(chain.from_iterable(seqs)), dtype=torch.int64, device=dev)


def _row_values(values: list[float], keys: torch.Tensor, rows: list[int], vocab: int,
                dtype: torch.dtype) -> torch.Tensor:
    """Each flat key's row's value (``values[i]`` belongs to logits row ``rows[i]``)."""
    by_row = torch.zeros(max(rows) + 1, dtype=dtype, device=keys.device)
    by_row[torch.tensor(rows, device=keys.device)] = torch.tensor(values, dtype=dtype, device=keys.device)
    return by_row[keys // vocab]


def _ids(values, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=like.device)
