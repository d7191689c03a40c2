"""Small-batch fp32 projections on CPU with our C kernel: the weight streamed once, split across every thread.

For decode steps of up to 4 tokens, ``F.linear`` (one thread's GEMV for these
shapes here) reads the weights at about half the machine's bandwidth; this
kernel splits the output rows across threads and reaches most of it (see
``_gemv.c``; ``loadtests/bench/gemv.py`` measures both). Built per ISA level
by :mod:`server.native`, like the LoRA kernel, sharing its 16-lane arithmetic.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F

from server.native import NativeFunction, NativeLibrary

MAX_TOKENS = 4  # the kernel's tile height: larger batches are matrix products, left to torch
_HERE = Path(__file__).parent
_LIB = NativeLibrary(
    _HERE / "_gemv.c", "gemv", cflags=("-ffp-contract=off",), depends=(_HERE.parent / "lora" / "_lora_vec.h",)
)
_ARGTYPES = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
_ARGTYPES += [ctypes.c_int64] * 3 + [ctypes.c_int]
_GEMV = NativeFunction(_LIB, "loraplex_gemv_f32", _ARGTYPES)

available = _GEMV.available  # (isa=None) -> bool: built and loaded on first call

build = _GEMV.build  # (isa) -> Path: compiled, runnable here or not


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *, isa: str | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)``: by our kernel for fp32 CPU tensors with 1..4 rows of ``x`` (unit column stride,
    ``w`` and ``b`` contiguous), by torch otherwise. ``x [T, K]``, ``w [N, K]``, ``b [N]``; returns ``[T, N]``::

        y[t, n] = sum_k x[t, k] * w[n, k] (+ b[n])     # fp32, fused multiply-adds in 16 lanes
    """
    fn = _GEMV.get(isa)  # built and loaded on first use; None where gcc is missing: torch's path
    t = x.shape[0] if x.dim() == 2 else 0
    if (
        fn is None
        or not 1 <= t <= MAX_TOKENS
        or x.dtype is not torch.float32
        or w.dtype is not torch.float32
        or not x.is_cpu
        or x.stride(1) != 1
        or not w.is_contiguous()
        or (b is not None and not (b.dtype is torch.float32 and b.is_contiguous()))
        or w.shape[1] != x.shape[1]
    ):
        if fn is None and isa is not None:
            raise RuntimeError(f"the {isa} build of the GEMV kernel is not available")
        return F.linear(x, w, b)
    n, k = w.shape
    y = torch.empty(t, n, dtype=torch.float32)
    err = fn(
        y.data_ptr(), x.data_ptr(), x.stride(0), w.data_ptr(), None if b is None else b.data_ptr(), t, k, n,
        torch.get_num_threads(),
    )
    if err:
        raise ValueError(f"GEMV kernel failed with error {err}")
    return y
