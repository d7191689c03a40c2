"""Device adapter slots: preallocated per-module buffers; activating an adapter is a copy."""

from __future__ import annotations

import torch

from server import memory
from server.lora.ops import ModuleSlots
from server.lora.weights import AdapterWeights


class SlotPool:
    """``num_slots`` adapter slots for every target module of the model.

    Buffers are allocated once at start-up (``A [S, R, d_in]``, ``B^T [S, R, d_out]``,
    per-slot scale and rank); writing an adapter into a slot copies its matrices,
    zero-pads ranks below ``max_rank`` and never allocates. Which slot is free is
    the adapter cache's business; this class only holds memory.
    """

    def __init__(
        self,
        module_dims: dict[str, tuple[int, int]],
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_slots < 1 or max_rank < 1:
            raise ValueError("num_slots and max_rank must be positive")
        self.num_slots, self.max_rank, self.device = num_slots, max_rank, device
        self.modules: dict[str, ModuleSlots] = {}
        # One [modules, slots] table each, so activating a slot sets a whole column in one op.
        self._scale = torch.zeros(len(module_dims), num_slots, dtype=torch.float32, device=device)
        self._rank = torch.zeros(len(module_dims), num_slots, dtype=torch.int32, device=device)
        for i, (name, (d_in, d_out)) in enumerate(module_dims.items()):
            self.modules[name] = ModuleSlots(
                a=memory.zeros((num_slots, max_rank, d_in), dtype, device),
                bt=memory.zeros((num_slots, max_rank, d_out), dtype, device),
                scale=self._scale[i],
                rank=self._rank[i],
                host_rank=[0] * num_slots,
                host_scale=[0.0] * num_slots,
            )
        self._touched: list[set[str]] = [set() for _ in range(num_slots)]
        self._projections: list[frozenset[str]] = [frozenset()] * num_slots

    @property
    def nbytes(self) -> int:
        return sum(m.a.numel() * m.a.element_size() + m.bt.numel() * m.bt.element_size() for m in self.modules.values())

    def write(self, slot: int, weights: AdapterWeights) -> None:
        """Copy ``weights`` into ``slot``; rows the previous adapter left behind are zeroed.

        Modules the adapter does not target get rank 0 and zero rows, so the slot contributes exactly zero there.
        """
        for name in self._touched[slot] | weights.a.keys():
            m = self.modules[name]
            old = m.host_rank[slot]
            a = weights.a.get(name)
            r = 0 if a is None else a.shape[0]
            if a is not None:
                m.a[slot, :r].copy_(a, non_blocking=True)
                m.bt[slot, :r].copy_(weights.bt[name], non_blocking=True)
            if old > r:
                m.a[slot, r:old].zero_()
                m.bt[slot, r:old].zero_()
            m.host_rank[slot] = r
            m.host_scale[slot] = weights.scale[name] if a is not None else 0.0
        self._sync_column(slot)
        self._touched[slot] = set(weights.a)
        self._projections[slot] = frozenset(name.rsplit(".", 1)[-1] for name in weights.a)

    def projections(self, slot: int) -> frozenset[str]:
        """Short names (``q_proj``, ...) of the projections the adapter in ``slot`` changes in some layer."""
        return self._projections[slot]

    def clear(self, slot: int) -> None:
        """Zero what the slot's adapter wrote, so the slot contributes exactly zero."""
        for name in self._touched[slot]:
            m = self.modules[name]
            r = m.host_rank[slot]
            m.a[slot, :r].zero_()
            m.bt[slot, :r].zero_()
            m.host_rank[slot] = 0
            m.host_scale[slot] = 0.0
        self._sync_column(slot)
        self._touched[slot] = set()
        self._projections[slot] = frozenset()

    def _sync_column(self, slot: int) -> None:
        """Device scale and rank of ``slot`` for every module, from the host mirrors, in two copies."""
        modules = self.modules.values()
        self._scale[:, slot].copy_(torch.tensor([m.host_scale[slot] for m in modules], dtype=torch.float32))
        self._rank[:, slot].copy_(torch.tensor([m.host_rank[slot] for m in modules], dtype=torch.int32))
