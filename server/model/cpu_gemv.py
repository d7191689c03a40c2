"""Small-batch projections on CPU with our C kernel: the weight streamed once, split across every thread.

For decode steps of a few tokens, ``F.linear`` (one thread's GEMV for these
shapes here) reads fp32 weights at about half the machine's bandwidth and bf16
ones slower still; this kernel splits the output rows across threads and
reaches most of it (see ``_gemv.c``; ``loadtests/bench/gemv.py`` measures
both). It also reads 8- and 4-bit codes with per-group scales, dequantized in
registers (:mod:`server.model.quantized`). Built per ISA level by
:mod:`server.native`, like the LoRA kernel, sharing its 16-lane arithmetic.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F

from server.native import NativeFunction, NativeLibrary

# Modes of the kernel (how W is stored), as _gemv.c numbers them.
W_F32, W_BF16, W_I8, W_U4 = 0, 1, 2, 3
# Token counts the kernel takes for dense weights; longer steps are matrix products, left to torch.
# Up to 16 tokens ours beats torch's (MKL) fp32 GEMM on the wide projections of a 135M model (2 threads,
# Zen 3: 78 vs 39 GFLOP/s at 16 tokens on 3072x576) and its bf16 path by more; beyond, torch's GEMM wins.
MAX_TOKENS = {torch.float32: 16, torch.bfloat16: 16}
# Steps of quantized weights up to this many tokens take integer dot products on 8-bit activations when asked
# (QDOT_TOKENS in _gemv.c, which decides; this mirrors it for callers and tests).
QDOT_TOKENS = 2
_HERE = Path(__file__).parent
_LIB = NativeLibrary(
    _HERE / "_gemv.c",
    "gemv",
    cflags=("-ffp-contract=off",),
    depends=(_HERE.parent / "lora" / "_lora_vec.h", _HERE / "_bf16.h", _HERE / "_gemv_codes.h", _HERE / "_gemv_qdot.h"),
)
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_GEMV = NativeFunction(
    _LIB, "loraplex_gemv",
    [_P, _P, _I, _P, _I, _P, _P, _I, _F, _P, _I, _I, _I, ctypes.c_int, ctypes.c_int, ctypes.c_int]
)
_DEQUANTIZE = NativeFunction(
    _LIB, "loraplex_dequantize", [_P, _P, _I, _P, _P, _I, _F, _I, _I, ctypes.c_int, ctypes.c_int]
)
_DENSE_MODES = {torch.float32: W_F32, torch.bfloat16: W_BF16}

available = _GEMV.available  # (isa=None) -> bool: built and loaded on first call

build = _GEMV.build  # (isa) -> Path: compiled, runnable here or not


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *, isa: str | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)``: by our kernel for fp32 or bf16 CPU tensors of one dtype with few rows of ``x``
    (``MAX_TOKENS``; unit column stride, ``w`` and ``b`` contiguous), by torch otherwise.
    ``x [T, K]``, ``w [N, K]``, ``b [N]``; returns ``[T, N]``::

        y[t, n] = sum_k x[t, k] * w[n, k] (+ b[n])     # fused multiply-adds in 16 fp32 lanes; bf16 y rounded once
    """
    fn = _GEMV.get(isa)  # built and loaded on first use; None where gcc is missing: torch's path
    t = x.shape[0] if x.dim() == 2 else 0
    dtype = x.dtype
    if (
        fn is None
        or not 1 <= t <= MAX_TOKENS.get(dtype, 0)
        or w.dtype is not dtype
        or not x.is_cpu
        or x.stride(1) != 1
        or not w.is_contiguous()
        or (b is not None and not (b.dtype is dtype and b.is_contiguous()))
        or w.shape[1] != x.shape[1]
    ):
        if fn is None and isa is not None:
            raise RuntimeError(f"the {isa} build of the GEMV kernel is not available")
        return F.linear(x, w, b)
    n, k = w.shape
    y = torch.empty(t, n, dtype=dtype)
    _check(fn(y.data_ptr(), x.data_ptr(), x.stride(0), w.data_ptr(), k * w.element_size(), None, None, 0, 0.0,
              _ptr(b), t, k, n, _DENSE_MODES[dtype], torch.get_num_threads(), 0))
    return y


def quantized_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    mode: int,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    group: int,
    offset: float,
    k: int,
    b: torch.Tensor | None = None,
    *,
    int8_activations: bool = False,
    isa: str | None = None,
) -> torch.Tensor:
    """``y [T, N] = x [T, K] @ dequantize(codes).T (+ b)``, fp32, by the kernel for any ``T`` (the weight read
    from memory once). ``codes``: ``[N, K]`` int8 (``W_I8``) or ``[N, K / 2]`` uint8 (``W_U4``).
    By default the dequantized values are multiplied exactly. ``int8_activations``: steps of up to
    ``QDOT_TOKENS`` tokens (``K`` whole 32-value blocks) first quantize ``x`` to 8 bits per block and take
    integer products (as GGML computes): faster, close to the exact product but not equal to it."""
    fn = _GEMV.get(isa)
    if fn is None:
        raise RuntimeError("quantized weights need the GEMV kernel, which did not build (is gcc installed?)")
    if x.dtype is not torch.float32 or x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"quantized linear takes fp32 x [T, {k}] with unit column stride, got {tuple(x.shape)}")
    n, t = codes.shape[0], x.shape[0]
    y = torch.empty(t, n, dtype=torch.float32)
    if t:
        _check(fn(y.data_ptr(), x.data_ptr(), x.stride(0), codes.data_ptr(), codes.shape[1], scales.data_ptr(),
                  _ptr(mins), group, offset, _ptr(b), t, k, n, mode, torch.get_num_threads(),
                  int(int8_activations)))
    return y


def dequantize(
    codes: torch.Tensor, mode: int, scales: torch.Tensor, mins: torch.Tensor | None, group: int, offset: float, k: int
) -> torch.Tensor:
    """The fp32 matrix ``[N, K]`` the kernel multiplies by, written out (bit for bit the same values)."""
    fn = _DEQUANTIZE.get()
    if fn is None:
        raise RuntimeError("quantized weights need the GEMV kernel, which did not build (is gcc installed?)")
    out = torch.empty(codes.shape[0], k, dtype=torch.float32)
    _check(fn(out.data_ptr(), codes.data_ptr(), codes.shape[1], scales.data_ptr(), _ptr(mins), group, offset, k,
              codes.shape[0], mode, torch.get_num_threads()))
    return out


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(err: int) -> None:
    if err:
        raise ValueError(f"GEMV kernel failed with error {err}")
