"""Next-token choice per request, each with its own sampling parameters."""

from __future__ import annotations

import torch

from server.engine.request import SamplingParams


class Sampler:
    """Greedy rows share one argmax; sampled rows are drawn with their own generator.

    Every choice stays on the device until the one read of the step's tokens at the end: no host
    synchronisation per row (on CUDA, a ``.item()`` per sampled row would stall the stream each time).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def sample(self, logits: torch.Tensor, rows: list[tuple[str, SamplingParams]]) -> list[int]:
        """``logits [n, vocab]`` fp32; one ``(request_id, params)`` per row; returns token ids."""
        tokens = logits.argmax(dim=-1)
        for i, (request_id, params) in enumerate(rows):
            if not params.greedy:
                tokens[i] = self._draw(logits[i], params, self._generator(request_id, params))
        return tokens.tolist()

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator:
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            if params.seed is not None:
                gen.manual_seed(params.seed)
            else:
                gen.seed()
            self._generators[request_id] = gen
        return gen

    @staticmethod
    def _draw(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> torch.Tensor:
        """The drawn token id as a one-element tensor on the logits' device."""
        scores = logits / params.temperature
        if 0 < params.top_k < scores.shape[-1]:
            kth = torch.topk(scores, params.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            probs = torch.softmax(sorted_scores, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            drop = (probs.cumsum(-1) - probs) >= params.top_p
            sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
            scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=gen)[0]
