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
    TRITON = "triton"  # our Triton shrink/expand kernels (CUDA; the interpreter elsewhere)


TILE_TOKENS = 16  # tokens of one slot per Triton program (tl.dot needs >= 16 rows on GPUs)


@dataclass(frozen=True)
class TokenGroups:
    """The adapter tokens of a packed batch grouped by slot and cut into tiles of at most ``TILE_TOKENS``.

    ``rows[tile_start[k] : tile_start[k] + tile_len[k]]`` are the packed-batch rows of tile ``k``, which all
    use slot ``tile_slot[k]``. Built on the host from the step's slot list, so kernels get their grid
    without a device synchronisation.
    """

    rows: torch.Tensor  # [n] int32: adapter tokens' rows, grouped by slot (ascending), in order within a slot
    tile_slot: torch.Tensor  # [K] int32
    tile_start: torch.Tensor  # [K] int32: offset into rows
    tile_len: torch.Tensor  # [K] int32: 1..TILE_TOKENS
    num_tiles: int

    @classmethod
    def build(cls, token_slots: list[int], device: torch.device) -> TokenGroups:
        by_slot: dict[int, list[int]] = {}
        for t, s in enumerate(token_slots):
            if s >= 0:
                by_slot.setdefault(s, []).append(t)
        rows: list[int] = []
        tiles: list[tuple[int, int, int]] = []
        for slot in sorted(by_slot):
            group = by_slot[slot]
            for i in range(0, len(group), TILE_TOKENS):
                tiles.append((slot, len(rows) + i, min(TILE_TOKENS, len(group) - i)))
            rows += group
        table = torch.tensor(tiles, dtype=torch.int32).reshape(-1, 3).T.contiguous().to(device)
        return cls(
            rows=torch.tensor(rows, dtype=torch.int32, device=device),
            tile_slot=table[0],
            tile_start=table[1],
            tile_len=table[2],
            num_tiles=len(tiles),
        )


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
class ComposedTerms:
    """The extra terms of requests that compose several adapters.

    Term ``i`` adds ``weights[i] * scale[s] * B[s] A[s] x[rows[i]]`` with ``s``
    the slot of its adapter: the term's token row is gathered, run through the
    same op as any other token (``batch``, one row per term), weighted, and
    added back. A token composing k adapters has k terms.
    """

    rows: torch.Tensor  # [n] int64: the packed-batch row of each term
    weights: torch.Tensor  # [n, 1] float32
    batch: LoraBatch  # the terms' slots, one row per term


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
    composed: ComposedTerms | None = None
    groups: TokenGroups | None = None  # the Triton backend's tiles (every adapter token; nothing dense or sparse)

    @property
    def has_lora(self) -> bool:
        return (
            bool(self.dense_segments)
            or self.sparse_rows is not None
            or self.composed is not None
            or (self.groups is not None and self.groups.num_tiles > 0)
        )

    @classmethod
    def build(
        cls,
        token_slots: list[int],
        device: torch.device,
        backend: LoraBackend,
        dense_min_tokens: int = 16,
        composed: list[tuple[int, int, float]] | None = None,
    ) -> LoraBatch:
        """``composed``: (token row, slot, weight) terms of composing requests, whose own slot is -1."""
        if dense_min_tokens < 1:
            raise ValueError("dense_min_tokens must be at least 1")
        if backend is LoraBackend.TRITON:
            groups = TokenGroups.build(token_slots, device)
            return cls(
                token_slots=torch.tensor(token_slots, dtype=torch.int32, device=device),
                dense_segments=(),
                sparse_slots=None,
                sparse_rows=None,
                backend=backend,
                composed=_composed(composed, device, backend, dense_min_tokens) if composed else None,
                groups=groups,
            )
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
            composed=_composed(composed, device, backend, dense_min_tokens) if composed else None,
        )


def _composed(
    terms: list[tuple[int, int, float]], device: torch.device, backend: LoraBackend, dense_min_tokens: int
) -> ComposedTerms:
    terms = sorted(terms, key=lambda term: term[1])  # equal slots in runs, as for any batch
    return ComposedTerms(
        rows=torch.tensor([row for row, _, _ in terms], dtype=torch.int64, device=device),
        weights=torch.tensor([[weight] for _, _, weight in terms], dtype=torch.float32, device=device),
        batch=LoraBatch.build([slot for _, slot, _ in terms], device, backend, dense_min_tokens),
    )


def _runs(token_slots: list[int]) -> list[Segment]:
    runs: list[Segment] = []
    start = 0
    for t in range(1, len(token_slots) + 1):
        if t == len(token_slots) or token_slots[t] != token_slots[start]:
            runs.append(Segment(token_slots[start], start, t))
            start = t
    return runs
