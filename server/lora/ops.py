"""The batched low-rank matmul used by every LoRA-aware layer.

Stateless: each op accumulates into ``y`` in place and never allocates
adapter-sized buffers. Semantics are those of
:func:`server.lora.reference.add_lora_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.lora import cpu_kernel
from server.lora.metadata import ComposedTerms, LoraBackend, LoraBatch
from server.lora.reference import add_lora_reference


@dataclass
class ModuleSlots:
    """The device slot buffers of one target module (one projection of one layer).

    Rows of ``a``/``bt`` past an adapter's rank are zero; ``rank[s] == 0``
    means slot ``s`` holds an adapter that does not target this module.
    """

    a: torch.Tensor  # [S, R, d_in]
    bt: torch.Tensor  # [S, R, d_out]  (B transposed, so expand reads rows)
    scale: torch.Tensor  # [S] float32
    rank: torch.Tensor  # [S] int32
    host_rank: list[int]  # mirror of ``rank``: dense runs read it without a device sync
    host_scale: list[float]  # mirror of ``scale``


def add_lora(y: torch.Tensor, x: torch.Tensor, w: ModuleSlots, batch: LoraBatch) -> None:
    """``y[t] += scale[s] * (x[t] @ A[s,:r].T) @ B[s,:r].T`` for every token ``t`` with slot ``s >= 0``.

    ``y [T, d_out]`` may be a row-strided view (a slice of a fused projection's
    output); ``x [T, d_in]``. Base-only tokens and slots whose adapter does not
    target this module contribute exactly zero.
    """
    if batch.backend is LoraBackend.REFERENCE:
        add_lora_reference(y, x, w.a, w.bt, w.scale, w.rank, batch.token_slots)
    elif batch.backend is LoraBackend.TRITON:
        if batch.groups is not None and batch.groups.num_tiles:
            from server.lora.triton_kernels import add_lora_triton  # imports triton: only on this backend

            add_lora_triton(y, x, w.a, w.bt, w.scale, w.rank, batch.groups)
    else:
        for seg in batch.dense_segments:
            r = w.host_rank[seg.slot]
            if r == 0:
                continue
            h = x[seg.start : seg.end] @ w.a[seg.slot, :r].T
            y[seg.start : seg.end].addmm_(h, w.bt[seg.slot, :r], alpha=w.host_scale[seg.slot])
        if batch.sparse_rows is not None:
            if batch.backend is LoraBackend.CPU_KERNEL:
                cpu_kernel.add_lora_sparse(y, x, w.a, w.bt, w.scale, w.rank, batch.sparse_slots)
            else:
                _add_lora_gathered(y, x, w, batch.sparse_rows, batch.sparse_slots)
    if batch.composed is not None:
        _add_composed(y, x, w, batch.composed)


def _add_composed(y: torch.Tensor, x: torch.Tensor, w: ModuleSlots, terms: ComposedTerms) -> None:
    """``y[row] += weight * scale[s] * (x[row] @ A[s].T) @ B[s].T`` for each composed term, through the same op."""
    delta = y.new_zeros((terms.rows.numel(), y.shape[1]))
    add_lora(delta, x.index_select(0, terms.rows), w, terms.batch)
    y.index_add_(0, terms.rows, (delta.float() * terms.weights).to(y.dtype))


def _add_lora_gathered(
    y: torch.Tensor, x: torch.Tensor, w: ModuleSlots, rows: torch.Tensor, token_slots: torch.Tensor
) -> None:
    """Pure-torch fallback: gather each row's slot weights and run two bmm's."""
    slots = token_slots.index_select(0, rows).long()
    xs = x.index_select(0, rows).unsqueeze(-1)  # [n, d_in, 1]
    h = torch.bmm(w.a.index_select(0, slots), xs)  # [n, R, 1]
    h = h.squeeze(-1) * w.scale.index_select(0, slots).to(h.dtype).unsqueeze(-1)
    delta = torch.bmm(h.unsqueeze(1), w.bt.index_select(0, slots)).squeeze(1)  # [n, d_out]
    y.index_add_(0, rows, delta.to(y.dtype))
