"""Attention over a packed batch with a paged KV cache.

The KV cache of one layer is a flat tensor ``[num_blocks * block_size, n_kv, head_dim]``;
a sequence's positions live in the blocks of its block table. Decode tokens of
all sequences share one SDPA call over their gathered, padded keys; each
prefill chunk gets its own causal SDPA call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.model import cpu_attention


@dataclass(frozen=True)
class PrefillSpan:
    """Rows ``start:end`` of the packed batch are one sequence's prompt chunk."""

    start: int
    end: int
    kv_index: torch.Tensor | None  # [L] flat cache positions of the whole context; None: no cached prefix
    mask: torch.Tensor | None  # [q, L] bool causal mask with the prefix offset; None: plain causal


@dataclass(frozen=True)
class AttentionBatch:
    """Per-step attention layout, built once and read by every layer."""

    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V is written
    decode_rows: torch.Tensor | None  # [B] int64: rows of decode tokens in the packed batch
    decode_kv_index: torch.Tensor | None  # [B, Lmax] int64 flat cache positions (padded with 0)
    decode_mask: torch.Tensor | None  # [B, 1, 1, Lmax] bool, True = attend
    decode_lengths: torch.Tensor | None  # [B] int32 context lengths
    prefills: tuple[PrefillSpan, ...]
    decode_kernel: bool  # decode through our CPU kernel (chosen once per step)

    @classmethod
    def build(
        cls,
        seqs: list[tuple[list[int], int, int]],
        block_size: int,
        device: torch.device,
        decode_kernel: bool = False,
    ) -> AttentionBatch:
        """``seqs``: per sequence, in packed order: (its block table, tokens already cached,
        tokens this step). Cache positions are computed from block tables with tensor ops,
        so the Python work per step grows with blocks, not with context length."""
        bs = block_size
        slot_mapping: list[int] = []
        decode_rows: list[int] = []
        decode: list[tuple[list[int], int]] = []
        prefills: list[PrefillSpan] = []
        row = 0
        for blocks, cached, new in seqs:
            slot_mapping.extend(blocks[p // bs] * bs + p % bs for p in range(cached, cached + new))
            if new == 1 and cached > 0:
                decode_rows.append(row)
                decode.append((blocks, cached + 1))
            elif cached == 0:
                prefills.append(PrefillSpan(row, row + new, None, None))
            else:
                length = cached + new
                idx = _positions(torch.tensor([blocks], device=device), length, bs)[0]
                q_pos = torch.arange(cached, length, device=device).unsqueeze(1)
                k_pos = torch.arange(length, device=device).unsqueeze(0)
                prefills.append(PrefillSpan(row, row + new, idx, k_pos <= q_pos))
            row += new
        d_rows = d_idx = d_mask = lengths = None
        if decode_rows:
            longest = max(n for _, n in decode)
            width = -(-longest // bs)
            table = torch.tensor([b[:width] + [0] * (width - len(b[:width])) for b, _ in decode], device=device)
            d_rows = torch.tensor(decode_rows, dtype=torch.int64, device=device)
            d_idx = _positions(table, longest, bs)
            lengths = torch.tensor([n for _, n in decode], dtype=torch.int32, device=device)
            if not decode_kernel:
                d_mask = (torch.arange(longest, device=device)[None, :] < lengths[:, None])[:, None, None, :]
        return cls(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
            decode_rows=d_rows,
            decode_kv_index=d_idx,
            decode_mask=d_mask,
            decode_lengths=lengths,
            prefills=tuple(prefills),
            decode_kernel=decode_kernel,
        )


def _positions(table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Flat cache positions ``[rows, length]`` of token positions ``0..length-1`` from block tables."""
    p = torch.arange(length, device=table.device)
    return table[:, p // block_size] * block_size + p % block_size


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:
    """Write this step's ``k``/``v`` into the cache and attend.

    ``q [T, n_heads, hd]``, ``k``/``v`` ``[T, n_kv, hd]``; returns ``[T, n_heads * hd]``.
    """
    k_cache.index_copy_(0, batch.slot_mapping, k)
    v_cache.index_copy_(0, batch.slot_mapping, v)
    t, n_heads, hd = q.shape
    od = None
    if batch.decode_rows is not None and batch.decode_kernel:
        # A step of decode tokens only has them in order: q as it is, and the kernel's output is the answer.
        qd = q.contiguous() if not batch.prefills else q.index_select(0, batch.decode_rows)  # [B, H, hd]
        od = cpu_attention.decode_attention(
            qd, k_cache, v_cache, batch.decode_kv_index, batch.decode_lengths, scale
        )
        if not batch.prefills:
            return od.view(t, n_heads * hd)
    out = torch.empty(t, n_heads, hd, dtype=q.dtype, device=q.device)
    gqa = n_heads != k.shape[1]
    if od is not None:
        out.index_copy_(0, batch.decode_rows, od)
    elif batch.decode_rows is not None:
        qd = q.index_select(0, batch.decode_rows).unsqueeze(2)  # [B, H, 1, hd]
        b, length = batch.decode_kv_index.shape
        flat = batch.decode_kv_index.view(-1)
        kd = k_cache.index_select(0, flat).view(b, length, *k_cache.shape[1:]).transpose(1, 2)  # [B, KV, L, hd]
        vd = v_cache.index_select(0, flat).view(b, length, *v_cache.shape[1:]).transpose(1, 2)
        od = F.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=batch.decode_mask, scale=scale, enable_gqa=gqa
        )
        out.index_copy_(0, batch.decode_rows, od.squeeze(2))
    for span in batch.prefills:
        qs = q[span.start : span.end].transpose(0, 1).unsqueeze(0)  # [1, H, q, hd]
        if span.kv_index is None:
            ks = k[span.start : span.end].transpose(0, 1).unsqueeze(0)
            vs = v[span.start : span.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            ks = k_cache.index_select(0, span.kv_index).transpose(0, 1).unsqueeze(0)
            vs = v_cache.index_select(0, span.kv_index).transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=span.mask, scale=scale, enable_gqa=gqa)
        out[span.start : span.end] = o.squeeze(0).transpose(0, 1)
    return out.view(t, n_heads * hd)
