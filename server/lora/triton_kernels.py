"""Triton kernels of the batched LoRA op for CUDA: shrink (``x @ A^T`` into an fp32 buffer) and expand
(``@ B^T``, scaled, added into ``y``).

The work comes in tiles (:class:`server.lora.metadata.TokenGroups`, built once per step on the host): each
tile is up to ``TILE_TOKENS`` rows of the packed batch that use one adapter slot. A program handles one tile
and one block of the rank (shrink) or of the output columns (expand):

- a slot's rank bounds its work: shrink programs for rank blocks past it return at once and expand loops
  only to it, so mixed ranks are never padded to the maximum;
- base-only tokens are in no tile and are never read or written, so they contribute exactly zero;
- hidden sizes are runtime arguments, masked at the edges: any size works;
- bf16 and fp16 inputs go through ``tl.dot`` with fp32 accumulation; the rank-sized intermediate stays fp32
  and the expand is an fp32 dot. fp32 inputs (and mixed fp32 activations with bf16 weights) use fp32 dots
  with IEEE precision, not TF32.

With ``TRITON_INTERPRET=1`` (set before triton is first imported) the same kernels run in Triton's
interpreter, on CPU tensors too; that is how CI, which has no GPU, checks them. The interpreter's ``tl.dot``
mis-reads bf16 operands, so there the operands are widened to fp32 first: the products of bf16 values are
exact in fp32 either way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from server.lora.metadata import TILE_TOKENS, TokenGroups

BLOCK_R, BLOCK_K, BLOCK_N = 16, 64, 64  # tl.dot needs every block dimension >= 16 on GPUs


@triton.jit
def _tile(rank_ptr, rows_ptr, tile_slot_ptr, tile_start_ptr, tile_len_ptr, BLOCK_M: tl.constexpr):
    """This program's tile: its slot and that slot's rank, where its rows start, their lanes and which lanes
    hold a row, and the packed-batch rows themselves."""
    tile = tl.program_id(0)
    slot = tl.load(tile_slot_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    m = tl.arange(0, BLOCK_M)
    in_tile = m < tl.load(tile_len_ptr + tile)
    rows = tl.load(rows_ptr + start + m, mask=in_tile, other=0).to(tl.int64)
    return slot, tl.load(rank_ptr + slot), start, m, in_tile, rows


@triton.jit
def _shrink(
    x_ptr, a_ptr, h_ptr, rank_ptr, rows_ptr, tile_slot_ptr, tile_start_ptr, tile_len_ptr,
    d_in, stride_x, stride_as, stride_ar, stride_h,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, WIDEN: tl.constexpr,
):
    """h[i, r0:r0+BLOCK_R] = x[rows[i]] @ A[slot, r0:r0+BLOCK_R].T for the tile's rows i (fp32)."""
    r0 = tl.program_id(1) * BLOCK_R
    slot, rank, start, m, in_tile, rows = _tile(
        rank_ptr, rows_ptr, tile_slot_ptr, tile_start_ptr, tile_len_ptr, BLOCK_M
    )
    if r0 < rank:
        r = r0 + tl.arange(0, BLOCK_R)
        in_rank = r < rank
        a_base = a_ptr + slot.to(tl.int64) * stride_as
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, d_in, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            in_k = k < d_in
            xt = tl.load(x_ptr + rows[:, None] * stride_x + k[None, :], mask=in_tile[:, None] & in_k[None, :],
                         other=0.0)
            at = tl.load(a_base + r[None, :] * stride_ar + k[:, None], mask=in_rank[None, :] & in_k[:, None],
                         other=0.0)
            if WIDEN:
                acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(xt, at)  # bf16/fp16 operands, fp32 accumulator
        h = h_ptr + (start + m)[:, None].to(tl.int64) * stride_h + r[None, :]
        tl.store(h, acc, mask=in_tile[:, None] & in_rank[None, :])


@triton.jit
def _expand(
    h_ptr, bt_ptr, y_ptr, scale_ptr, rank_ptr, rows_ptr, tile_slot_ptr, tile_start_ptr, tile_len_ptr,
    d_out, stride_h, stride_bs, stride_br, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y[rows[i], cols] += scale[slot] * h[i, :rank] @ B^T[slot, :rank, cols], accumulated in fp32."""
    slot, rank, start, m, in_tile, rows = _tile(
        rank_ptr, rows_ptr, tile_slot_ptr, tile_start_ptr, tile_len_ptr, BLOCK_M
    )
    if rank > 0:
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_cols = cols < d_out
        b_base = bt_ptr + slot.to(tl.int64) * stride_bs
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            in_rank = r < rank
            ht = tl.load(h_ptr + (start + m)[:, None].to(tl.int64) * stride_h + r[None, :],
                         mask=in_tile[:, None] & in_rank[None, :], other=0.0)
            bt = tl.load(b_base + r[:, None] * stride_br + cols[None, :], mask=in_rank[:, None] & in_cols[None, :],
                         other=0.0)
            acc += tl.dot(ht, bt.to(tl.float32), input_precision="ieee")
        scale = tl.load(scale_ptr + slot)
        y = y_ptr + rows[:, None] * stride_y + cols[None, :]
        mask = in_tile[:, None] & in_cols[None, :]
        old = tl.load(y, mask=mask, other=0.0)
        tl.store(y, (old.to(tl.float32) + acc * scale).to(y_ptr.dtype.element_ty), mask=mask)


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (TRITON_INTERPRET=1 when triton was first imported)."""
    return bool(triton.knobs.runtime.interpret)


def add_lora_triton(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    scale: torch.Tensor,
    rank: torch.Tensor,
    groups: TokenGroups,
) -> None:
    """``y[t] += scale[s] * (x[t] @ A[s, :r].T) @ B^T[s, :r]`` for every grouped token ``t`` of slot ``s``.

    Shapes as :func:`server.lora.reference.add_lora_reference`; ``x`` and ``y`` need unit column stride (``y``
    may be a column slice of a wider output), ``a`` and ``bt`` contiguous. No host synchronisation: the grid
    comes from ``groups``, built on the host.
    """
    if groups.num_tiles == 0:
        return
    if x.stride(1) != 1 or y.stride(1) != 1 or not (a.is_contiguous() and bt.is_contiguous()):
        raise ValueError("add_lora_triton needs unit column strides for x and y and contiguous slot buffers")
    interpret = interpreted()
    if x.device.type != "cuda" and not interpret:
        raise RuntimeError(
            f"the Triton LoRA kernels run on CUDA tensors, not {x.device.type} (or, for tests, on CPU tensors "
            "in Triton's interpreter: TRITON_INTERPRET=1 set before triton is imported)"
        )
    max_rank, d_in, d_out = a.shape[1], x.shape[1], y.shape[1]
    widen = interpret or x.dtype == torch.float32 or a.dtype == torch.float32 or x.dtype != a.dtype
    h = torch.empty((groups.rows.numel(), max_rank), dtype=torch.float32, device=x.device)
    tiles = (groups.rows, groups.tile_slot, groups.tile_start, groups.tile_len)
    _shrink[(groups.num_tiles, triton.cdiv(max_rank, BLOCK_R))](
        x, a, h, rank, *tiles, d_in, x.stride(0), a.stride(0), a.stride(1), h.stride(0),
        BLOCK_M=TILE_TOKENS, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, WIDEN=widen,
    )
    _expand[(groups.num_tiles, triton.cdiv(d_out, BLOCK_N))](
        h, bt, y, scale, rank, *tiles, d_out, h.stride(0), bt.stride(0), bt.stride(1), y.stride(0),
        BLOCK_M=TILE_TOKENS, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N,
    )
