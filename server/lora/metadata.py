"""Per-step adapter layout of a packed batch: built once per step, read by every LoRA layer."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class LoraBackend(enum.Enum):
    """How the short runs of a batch are computed; chosen once per step."""

    REFERENCE = "reference"  # fp32 loop, the oracle
    TORCH = "torch"  # gather + bmm, pure torch, any device and dtype
    CPU_KERNEL = "cpu"  # our C/OpenMP kernel (fp32 and bf16 on CPU)


@dataclass(frozen=True)
class Segment:
    """Tokens ``start:end`` of the packed batch all use adapter slot ``slot``."""

    slot: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class LoraBatch:
    """Which adapter slot each token of a packed batch uses.

    With the torch backend, runs of at least ``dense_min_tokens`` equal slots
    (prefill chunks) are computed as two dense matmuls each; every other
    adapter token goes through one gathered call per layer (``sparse_slots``).
    The CPU kernel takes every token in one call: it groups tokens by slot
    itself and beat the dense matmuls on this CPU even for long runs.
    """

    token_slots: torch.Tensor  # [T] int32 on device; -1 = base model only
    dense_segments: tuple[Segment, ...]  # long runs: dense matmuls
    sparse_slots: torch.Tensor | None  # [T] int32: slot for tokens of short runs, -1 elsewhere
    sparse_rows: torch.Tensor | None  # [n] int64: the rows of sparse_slots that are >= 0
    backend: LoraBackend

    @property
    def has_lora(self) -> bool:
        return bool(self.dense_segments) or self.sparse_rows is not None

    @classmethod
    def build(
        cls,
        token_slots: list[int],
        device: torch.device,
        backend: LoraBackend,
        dense_min_tokens: int = 16,
    ) -> LoraBatch:
        if dense_min_tokens < 1:
            raise ValueError("dense_min_tokens must be at least 1")
        segments = _runs(token_slots) if backend is LoraBackend.TORCH else []
        dense = tuple(s for s in segments if s.slot >= 0 and s.length >= dense_min_tokens)
        sparse = list(token_slots)
        for seg in dense:
            sparse[seg.start : seg.end] = [-1] * seg.length
        rows = [t for t, s in enumerate(sparse) if s >= 0]
        return cls(
            token_slots=torch.tensor(token_slots, dtype=torch.int32, device=device),
            dense_segments=dense,
            sparse_slots=torch.tensor(sparse, dtype=torch.int32, device=device) if rows else None,
            sparse_rows=torch.tensor(rows, dtype=torch.int64, device=device) if rows else None,
            backend=backend,
        )


def _runs(token_slots: list[int]) -> list[Segment]:
    runs: list[Segment] = []
    start = 0
    for t in range(1, len(token_slots) + 1):
        if t == len(token_slots) or token_slots[t] != token_slots[start]:
            runs.append(Segment(token_slots[start], start, t))
            start = t
    return runs
