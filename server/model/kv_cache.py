"""Device memory of the paged KV cache: per layer, flat K and V tensors."""

from __future__ import annotations

import torch

from server import memory
from server.model.architecture import ModelShape


def bytes_per_token(shape: ModelShape, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * shape.n_layers * shape.kv_dim * element


def allocate_kv_cache(
    shape: ModelShape, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(k, v)``, each ``[num_blocks * block_size, n_kv_heads, head_dim]``."""
    slots = num_blocks * block_size
    store = memory.zeros((shape.n_layers, 2, slots, shape.n_kv_heads, shape.head_dim), dtype, device)
    return [(store[i, 0], store[i, 1]) for i in range(shape.n_layers)]
