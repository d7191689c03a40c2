"""Next-token choice for a batch of requests, each with its own sampling parameters.

One pass over the batch: the model's log-probs where asked for, then logit processing (bias, min_tokens,
penalties: :mod:`server.engine.logits_processing`) and grammar masks (:mod:`server.engine.grammar`), then one
argmax for the greedy rows and one batched draw for the sampled rows. Temperature, min_p, top-k and top-p are
applied to all sampled rows together; the draw is an exponential race (``argmax p / q``, ``q ~ Exp(1)``),
which picks each token with its probability. A seeded request draws its ``q`` from its own generator, so its
tokens do not depend on what else is in the batch; the others share one.

Every choice stays on the device until the one read of the step's tokens at the end: no host
synchronisation per row (on CUDA, a ``.item()`` per sampled row would stall the stream each time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from server.engine import grammar, logits_processing
from server.engine.logprobs import TokenLogprob, token_logprobs
from server.engine.request import Request

TOP_K_FAST = 1024  # rows with a top_k up to this draw among their top-k candidates only


@dataclass
class Sampled:
    tokens: list[int]
    logprobs: dict[int, TokenLogprob] = field(default_factory=dict)  # by row, for the rows that asked


class Sampler:
    def __init__(self, device: torch.device, eos_token_ids: frozenset[int] = frozenset()) -> None:
        self.device = device
        self.eos_token_ids = eos_token_ids
        self._generators: dict[str, torch.Generator] = {}  # seeded requests' own
        self._shared = torch.Generator(device=device)
        self._shared.seed()

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> Sampled:
        """``logits [n, vocab]`` fp32, row ``i`` for ``reqs[i]``'s next token; the chosen tokens."""
        want = [i for i, r in enumerate(reqs) if r.wants_logprobs]
        # a copy of those rows: the processing below is in place, and the log-probs are the model's
        want_rows = torch.tensor(want, device=logits.device) if want else None
        raw = logits.index_select(0, want_rows) if want_rows is not None else logits[:0]
        logits_processing.process(logits, reqs, self.eos_token_ids)
        guided = [i for i, r in enumerate(reqs) if r.grammar is not None]
        if guided:
            grammar.mask(logits, guided, [reqs[i].grammar for i in guided])
        tokens = logits.argmax(dim=-1)
        drawn = [i for i, r in enumerate(reqs) if not r.params.greedy]
        if drawn:
            index = torch.tensor(drawn, device=logits.device)
            tokens.index_copy_(0, index, self._draw(logits.index_select(0, index), [reqs[i] for i in drawn]))
        out = Sampled(tokens.tolist())
        if want_rows is not None:
            tops = [reqs[i].params.logprobs or 0 for i in want]
            chosen = tokens.index_select(0, want_rows)
            out.logprobs = dict(zip(want, token_logprobs(raw, chosen, tops), strict=True))
        return out

    def _draw(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """One token id per row, drawn from each row's tempered, filtered distribution. Rows with a top-k of
        at most ``TOP_K_FAST`` draw among their top-k candidates only (no sort or draw over the vocabulary)."""
        dev, vocab = logits.device, logits.shape[-1]
        temps = torch.tensor([r.params.temperature for r in reqs], dtype=logits.dtype, device=dev)
        scores = logits / temps.view(-1, 1)
        tokens = torch.empty(len(reqs), dtype=torch.int64, device=dev)
        short = [i for i, r in enumerate(reqs) if 0 < r.params.top_k <= min(TOP_K_FAST, vocab - 1)]
        if short:
            index = torch.tensor(short, device=dev)
            group = [reqs[i] for i in short]
            values, ids = scores.index_select(0, index).topk(max(r.params.top_k for r in group), dim=-1)
            pick = self._race(_filter_sorted(values, group), group)
            tokens.index_copy_(0, index, ids.gather(1, pick.view(-1, 1)).view(-1))
        if len(short) < len(reqs):
            taken = set(short)
            rest = [i for i in range(len(reqs)) if i not in taken]
            index = torch.tensor(rest, device=dev)
            group = [reqs[i] for i in rest]
            sub = scores.index_select(0, index)
            if any(r.params.filtered for r in group):
                ordered, order = torch.sort(sub, dim=-1, descending=True)
                sub = torch.full_like(sub, float("-inf")).scatter(-1, order, _filter_sorted(ordered, group))
            tokens.index_copy_(0, index, self._race(sub, group))
        return tokens

    def _race(self, scores: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Per row, the index drawn with probability ``softmax(scores)``: ``argmax p / q`` with ``q ~ Exp(1)``."""
        probs = torch.softmax(scores, dim=-1)
        race = torch.empty_like(probs).exponential_(generator=self._shared)
        for i, r in enumerate(reqs):
            if r.params.seed is not None:
                race[i].exponential_(generator=self._generator(r))
        return (probs / race).argmax(dim=-1)

    def _generator(self, req: Request) -> torch.Generator:
        gen = self._generators.get(req.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(req.params.seed or 0)
            self._generators[req.request_id] = gen
        return gen


def _filter_sorted(ordered: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """``ordered``: each row's scores, highest first (all of them, or the top few). -inf where the row drops a
    token: min_p (a score below the best's plus log min_p: probability below min_p times the best's), top-k,
    then top-p over what is left, as vLLM orders them."""
    dev, dtype, width = ordered.device, ordered.dtype, ordered.shape[-1]
    min_p = [r.params.min_p for r in reqs]
    if any(min_p):
        floor = torch.tensor([math.log(p) if p > 0 else float("-inf") for p in min_p], dtype=dtype, device=dev)
        ordered = ordered.masked_fill(ordered < ordered[:, :1] + floor.view(-1, 1), float("-inf"))
    ks = [r.params.top_k if 0 < r.params.top_k < width else width for r in reqs]
    if any(k < width for k in ks):
        ranks = torch.arange(width, device=dev).view(1, -1)
        ordered = ordered.masked_fill(ranks >= torch.tensor(ks, device=dev).view(-1, 1), float("-inf"))
    ps = [r.params.top_p for r in reqs]
    if any(p < 1.0 for p in ps):
        probs = torch.softmax(ordered, dim=-1)
        top_p = torch.tensor([p if p < 1.0 else 2.0 for p in ps], dtype=dtype, device=dev).view(-1, 1)
        # keep the smallest prefix whose mass reaches top_p (always the first token)
        ordered = ordered.masked_fill((probs.cumsum(dim=-1) - probs) >= top_p, float("-inf"))
    return ordered
