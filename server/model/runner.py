"""The model runner: packs one step's sequences, runs the forward pass, returns logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.lora.metadata import LoraBackend, LoraBatch
from server.lora.slots import SlotPool
from server.model.attention import AttentionBatch
from server.model.decoder import CausalLM, StepInputs
from server.model.kv_cache import allocate_kv_cache


@dataclass(frozen=True)
class SeqStep:
    """One sequence's share of a step."""

    token_ids: list[int]  # tokens fed this step (a prompt chunk, or the last sampled token)
    start: int  # position of token_ids[0] in the sequence
    blocks: list[int]  # the sequence's KV block table
    lora: tuple[tuple[int, float], ...]  # (slot, weight) of each adapter term; () for the base model
    sample: bool  # whether the logits of the last token are needed
    length: int = 0  # the sequence's tokens so far (prompt and outputs): longrope picks its table by it
    all_logits: bool = False  # the logits of every token fed are needed (prompt log-probs), not just the last's

    @property
    def logit_rows(self) -> int:
        """Rows of logits :meth:`ModelRunner.execute` returns for this sequence."""
        return len(self.token_ids) if self.all_logits else int(self.sample)

    @property
    def slot(self) -> int:
        """The slot of a sequence of one adapter at full weight (the LoRA op's segment path), else -1."""
        return self.lora[0][0] if len(self.lora) == 1 and self.lora[0][1] == 1.0 else -1

    @property
    def composed(self) -> tuple[tuple[int, float], ...]:
        """The terms that take the op's weighted path: every term, unless the sequence is plain or base."""
        return () if self.slot >= 0 else self.lora


def one_adapter(slot: int) -> tuple[tuple[int, float], ...]:
    """``SeqStep.lora`` for the adapter on ``slot`` at full weight (-1: the base model)."""
    return () if slot < 0 else ((slot, 1.0),)


class ModelRunner:
    """Owns the model weights, the KV cache tensors and the adapter slot buffers."""

    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        num_slots: int,
        max_rank: int,
        backend: LoraBackend,
        decode_kernel: bool = False,
        lora_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.device = model.device
        self.backend = backend
        self.decode_kernel = decode_kernel
        self.kv_cache = allocate_kv_cache(model.shape, num_blocks, block_size, model.dtype, model.device)
        dims = model.shape.projection_dims()
        modules = {
            model.shape.module_name(i, proj): dims[proj]
            for i in range(model.shape.n_layers)
            for proj in dims
        }
        self.slots = SlotPool(modules, num_slots, max_rank, lora_dtype or model.dtype, model.device)
        for i, layer in enumerate(model.layers):
            layer.lora = {proj: self.slots.modules[model.shape.module_name(i, proj)] for proj in dims}

    def execute(self, seqs: list[SeqStep]) -> torch.Tensor:
        """Run one packed forward pass; fp32 logits, in order, for each sequence's :attr:`SeqStep.logit_rows`
        (its last token's when ``sample`` is set; every token's with ``all_logits``)."""
        ids: list[int] = []
        positions: list[int] = []
        token_slots: list[int] = []
        sample_rows: list[int] = []
        terms: list[tuple[int, int, float]] = []  # (token row, slot, weight) of composed sequences
        for seq in seqs:
            n = len(seq.token_ids)
            for slot, weight in seq.composed:
                terms.extend((row, slot, weight) for row in range(len(ids), len(ids) + n))
            ids.extend(seq.token_ids)
            positions.extend(range(seq.start, seq.start + n))
            token_slots.extend([seq.slot] * n)
            sample_rows.extend(range(len(ids) - seq.logit_rows, len(ids)))
        dev = self.device
        layout = [(s.blocks, s.start, len(s.token_ids)) for s in seqs]
        window = self.model.shape.sliding_window
        attention = AttentionBatch.build(layout, self.block_size, dev, self.decode_kernel)
        step = StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            rope_rows=self._rope_rows(seqs, torch.tensor(positions, dtype=torch.int64, device=dev)),
            attention=attention,
            windowed=None if window is None else AttentionBatch.build(
                layout, self.block_size, dev, self.decode_kernel, window, attention.cache_rows
            ),
            lora=LoraBatch.build(token_slots, dev, self.backend, composed=terms),
            lora_projections=self._projections({slot for seq in seqs for slot, _ in seq.lora}),
            sample_rows=torch.tensor(sample_rows, dtype=torch.int64, device=dev),
        )
        return self.model.forward(step, self.kv_cache)

    def _rope_rows(self, seqs: list[SeqStep], positions: torch.Tensor) -> torch.Tensor:
        """Each token's row of the rotary tables: its position, or with longrope, past the short table's rows when
        its sequence is longer than the pretraining length, as transformers decides it (the whole sequence's
        length; the scheduler recomputes a sequence's cache once when it grows past it, as transformers'
        Phi-3 does)."""
        short = self.model.shape.long_rope_after
        if short is None:
            return positions
        offsets = [short if max(s.length, s.start + len(s.token_ids)) > short else 0 for s in seqs]
        counts = torch.tensor([len(s.token_ids) for s in seqs], device=positions.device)
        return positions + torch.tensor(offsets, device=positions.device).repeat_interleave(counts)

    def _projections(self, slots: set[int]) -> frozenset[str]:
        return frozenset().union(*(self.slots.projections(s) for s in slots if s >= 0))

    def warmup(self) -> None:
        """One small mixed step (base and slot 0) so the first request pays no first-call costs.

        It writes K/V into the first block only, which any later owner overwrites.
        """
        self.execute([SeqStep([0, 1], 0, [0], (), True), SeqStep([0], 2, [0], ((0, 1.0),), True)])
