"""Attention over a packed batch with a paged KV cache.

The KV cache of one layer is a flat tensor ``[num_blocks * block_size, n_kv, head_dim]``;
a sequence's positions live in the blocks of its block table. Decode tokens of
all sequences share one call over their gathered, padded keys (or our CPU kernel, keys read in place); each
prefill chunk gets its own causal call. A sliding-window layer reads a batch built with its window: only
the positions its queries see are gathered. Every position stays cached (a model's full-attention layers
share the block table), so the window bounds the work per token, not the cache.
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

    cache_rows: torch.Tensor  # [T] int64: where each new token's K/V is written
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
        window: int | None = None,
        cache_rows: torch.Tensor | None = None,
    ) -> AttentionBatch:
        """``seqs``: per sequence, in packed order: (its block table, tokens already cached,
        tokens this step). ``window``: each query attends only to the last ``window`` positions up to its own
        (transformers' sliding window: key ``j`` is seen from query ``i`` when ``i - window < j <= i``).
        Cache positions are computed from block tables with tensor ops, so the Python work per step grows with
        blocks, not with context length. ``cache_rows``: where this step's K/V go, when another layout of the
        same step already has it (the windowed one reuses the full one's)."""
        bs = block_size
        rows: list[int] = []
        decode_rows: list[int] = []
        decode: list[tuple[list[int], int]] = []
        prefills: list[PrefillSpan] = []
        row = 0
        for blocks, cached, new in seqs:
            if cache_rows is None:
                rows.extend(blocks[p // bs] * bs + p % bs for p in range(cached, cached + new))
            length = cached + new
            if new == 1 and cached > 0:
                decode_rows.append(row)
                decode.append((blocks, length))
            elif cached == 0 and (window is None or new <= window):
                prefills.append(PrefillSpan(row, row + new, None, None))
            else:  # a chunk after cached tokens, or one wider than the window
                first = 0 if window is None else max(0, cached - window + 1)  # the earliest key any query sees
                q_pos = torch.arange(cached, length, device=device).unsqueeze(1)
                k_pos = torch.arange(first, length, device=device).unsqueeze(0)
                mask = k_pos <= q_pos
                if window is not None:
                    mask &= k_pos > q_pos - window
                idx = None if cached == 0 else _positions(torch.tensor([blocks], device=device), k_pos, bs)[0]
                prefills.append(PrefillSpan(row, row + new, idx, mask))
            row += new
        d_rows = d_idx = d_mask = lengths = None
        if decode_rows:
            ends = torch.tensor([n for _, n in decode], device=device)
            starts = torch.zeros_like(ends) if window is None else (ends - window).clamp(min=0)
            lengths = (ends - starts).to(torch.int32)
            longest = int(lengths.max())
            width = -(-int(ends.max()) // bs)
            table = torch.tensor([b[:width] + [0] * (width - len(b[:width])) for b, _ in decode], device=device)
            d_rows = torch.tensor(decode_rows, dtype=torch.int64, device=device)
            # Each row's positions from its first visible one; past its length they repeat its last (unread).
            p = torch.minimum(starts[:, None] + torch.arange(longest, device=device)[None, :], ends[:, None] - 1)
            d_idx = _positions(table, p, bs)
            if not decode_kernel:
                d_mask = (torch.arange(longest, device=device)[None, :] < lengths[:, None])[:, None, None, :]
        return cls(
            cache_rows=(torch.tensor(rows, dtype=torch.int64, device=device) if cache_rows is None
                          else cache_rows),
            decode_rows=d_rows,
            decode_kv_index=d_idx,
            decode_mask=d_mask,
            decode_lengths=lengths,
            prefills=tuple(prefills),
            decode_kernel=decode_kernel,
        )


def _positions(table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat cache positions of token ``positions`` (``[rows, n]``, or ``[1, n]`` shared by all rows) through each
    row's block table ``[rows, width]``."""
    blocks = table.gather(1, (positions // block_size).expand(table.shape[0], -1))
    return blocks * block_size + positions % block_size


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Write this step's ``k``/``v`` into the cache and attend. ``softcap``: scores become
    ``softcap * tanh(scores / softcap)`` before the mask and softmax (Gemma 2).

    ``q [T, n_heads, hd]``, ``k``/``v`` ``[T, n_kv, hd]``; returns ``[T, n_heads * hd]``.
    """
    k_cache.index_copy_(0, batch.cache_rows, k)
    v_cache.index_copy_(0, batch.cache_rows, v)
    t, n_heads, hd = q.shape
    od = None
    if batch.decode_rows is not None and batch.decode_kernel:
        # A step of decode tokens only has them in order: q as it is, and the kernel's output is the answer.
        qd = q.contiguous() if not batch.prefills else q.index_select(0, batch.decode_rows)  # [B, H, hd]
        od = cpu_attention.decode_attention(
            qd, k_cache, v_cache, batch.decode_kv_index, batch.decode_lengths, scale, softcap
        )
        if not batch.prefills:
            return od.view(t, n_heads * hd)
    out = torch.empty(t, n_heads, hd, dtype=q.dtype, device=q.device)
    if od is not None:
        out.index_copy_(0, batch.decode_rows, od)
    elif batch.decode_rows is not None:
        qd = q.index_select(0, batch.decode_rows).unsqueeze(2)  # [B, H, 1, hd]
        b, length = batch.decode_kv_index.shape
        flat = batch.decode_kv_index.view(-1)
        kd = k_cache.index_select(0, flat).view(b, length, *k_cache.shape[1:]).transpose(1, 2)  # [B, KV, L, hd]
        vd = v_cache.index_select(0, flat).view(b, length, *v_cache.shape[1:]).transpose(1, 2)
        od = _attention(qd, kd, vd, batch.decode_mask, scale, softcap)
        out.index_copy_(0, batch.decode_rows, od.squeeze(2))
    for span in batch.prefills:
        qs = q[span.start : span.end].transpose(0, 1).unsqueeze(0)  # [1, H, q, hd]
        if span.kv_index is None:
            ks = k[span.start : span.end].transpose(0, 1).unsqueeze(0)
            vs = v[span.start : span.end].transpose(0, 1).unsqueeze(0)
        else:
            ks = k_cache.index_select(0, span.kv_index).transpose(0, 1).unsqueeze(0)
            vs = v_cache.index_select(0, span.kv_index).transpose(0, 1).unsqueeze(0)
        o = _attention(qs, ks, vs, span.mask, scale, softcap)
        out[span.start : span.end] = o.squeeze(0).transpose(0, 1)
    return out.view(t, n_heads * hd)


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """``q [B, H, q, hd]`` over ``k``/``v`` ``[B, KV, L, hd]``; ``mask`` (True = attend) broadcast to
    ``[B, H, q, L]``, or None: causal with the queries as the last ``q`` keys."""
    gqa = q.shape[1] != k.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa
        )
    if gqa:  # transformers' eager attention: repeat the kv heads, scores in q's dtype, softmax in fp32
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        n, length = q.shape[2], k.shape[2]
        mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(length - n)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
