"""Zero-filled buffers whose pages are committed only when first written.

``torch.zeros`` on the CPU writes every byte up front (seconds for the KV
cache and adapter slots); numpy's calloc-backed zeros map zero pages lazily,
so start-up stays fast and untouched capacity costs no resident memory.
"""

from __future__ import annotations

import numpy as np
import torch

_NUMPY_SAME_WIDTH = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.bfloat16: np.int16,  # same width; reinterpreted below (the zero bit pattern is 0.0)
    torch.int32: np.int32,
    torch.int64: np.int64,
}


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu" or dtype not in _NUMPY_SAME_WIDTH:
        return torch.zeros(shape, dtype=dtype, device=device)
    t = torch.from_numpy(np.zeros(shape, dtype=_NUMPY_SAME_WIDTH[dtype]))
    return t.view(dtype) if t.dtype != dtype else t
