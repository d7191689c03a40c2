"""Log-probabilities of chosen tokens and their top alternatives, for a batch of rows at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from server.engine.request import Request


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token there, its log-prob, and the ``k`` likeliest tokens with theirs (best first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int = 1  # 1 + the tokens more likely than it (computed for prompt log-probs only)


def token_logprobs(
    logits: torch.Tensor, chosen: torch.Tensor, tops: list[int], ranks: bool = False
) -> list[TokenLogprob]:
    """``logits [n, vocab]`` (the model's, before any sampling filter), ``chosen [n]`` token ids, ``tops[i]``
    alternatives for row ``i``; each chosen token's rank when ``ranks`` (else 1: a pass over the vocabulary
    that only prompt log-probs show). One log-softmax and one host read for the whole batch."""
    if not tops:
        return []
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(1, chosen.view(-1, 1))
    rank = (logp > picked).sum(dim=-1).add_(1).tolist() if ranks else [1] * len(tops)
    picked = picked.view(-1)
    k = max(tops)
    if k:
        values, ids = torch.topk(logp, k, dim=-1)
        top_v, top_i = values.tolist(), ids.tolist()
    out = []
    for i, (token, lp) in enumerate(zip(chosen.tolist(), picked.tolist(), strict=True)):
        top = tuple(zip(top_i[i][: tops[i]], top_v[i][: tops[i]], strict=True)) if k and tops[i] else ()
        out.append(TokenLogprob(token, lp, top, rank[i]))
    return out


def prompt_logprobs(logits: torch.Tensor, spans: list[tuple[Request, int, int, int]]) -> None:
    """Append to each request's ``prompt_logprobs`` the positions this step's logits give and it lacks.

    ``spans``: (request, its first row of ``logits``, the position of its first token fed, the tokens fed); row
    ``first + i`` holds the logits after position ``start + i``, which score the prompt token at
    ``start + i + 1``. A request computed again after a preemption already has the earlier positions.
    """
    rows: list[int] = []
    targets: list[int] = []
    owners: list[Request] = []
    for req, first, start, fed in spans:
        have = len(req.prompt_logprobs) + 1  # the next prompt position without its log-prob
        for pos in range(max(have, start + 1), min(len(req.prompt_ids), start + 1 + fed)):
            rows.append(first + pos - start - 1)
            targets.append(req.prompt_ids[pos])
            owners.append(req)
    if not rows:
        return
    device = logits.device
    index = torch.tensor(rows, device=device)
    tops = [req.params.prompt_logprobs or 0 for req in owners]
    values = token_logprobs(logits.index_select(0, index), torch.tensor(targets, device=device), tops, ranks=True)
    for req, value in zip(owners, values, strict=True):
        req.prompt_logprobs.append(value)
