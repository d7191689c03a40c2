"""The C/OpenMP mixed-adapter LoRA kernel for CPU (fp32, bf16, or fp32 with bf16 weights), built on first use.

``_lora_kernel.c`` is compiled and cached by :mod:`server.native`, once per
ISA level (AVX-512, AVX2 + FMA, portable C), and loaded with ctypes, sharing
torch's OpenMP thread pool. Calls use the build for the best level this CPU
runs; every build gives bit-identical results (see the C source).
"""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import torch

from server.native import NativeFunction, NativeLibrary

_HERE = Path(__file__).parent
# -ffp-contract=off: only the multiply-adds the source fuses are fused, the same in every build.
_LIB = NativeLibrary(
    _HERE / "_lora_kernel.c", "lora_kernel", cflags=("-ffp-contract=off",), depends=(_HERE / "_lora_vec.h",)
)
# What loraplex_kernel_isa() answers for each build.
ISA_CODES = {"avx512": 2, "avx2": 1, "portable": 0}
_F32, _BF16, _I32 = torch.float32, torch.bfloat16, torch.int32
# {dtype code, y, ldy, x, ldx, a, bt, scale, rank, slots, T, d_in, d_out, S, R, threads}: see the C source
# Dtype codes by (activation dtype of x and y, weight dtype of a and bt).
_DT_CODES = {(_F32, _F32): 0, (_BF16, _BF16): 1, (_F32, _BF16): 2}
_pack = struct.Struct("16q").pack
_ERRORS = {
    1: "a slot index is >= the number of slots",
    2: "a slot's rank is outside [0, R]",
    3: "could not allocate the kernel's scratch buffer",
    4: "invalid sizes",
}
# The packed entry point: the int64 arguments in one buffer, passed without a copy.
_ADD = NativeFunction(_LIB, "loraplex_add_lora_sparse_packed", [ctypes.c_char_p])

available = _ADD.available  # (isa=None) -> bool: built and loaded on first call


def compiled_isa(isa: str | None = None) -> int:
    """The vector layer the ``isa`` build compiled, as loraplex_kernel_isa() reports it (see ISA_CODES)."""
    fn = _LIB.function("loraplex_kernel_isa", [], isa=isa)
    if fn is None:
        raise RuntimeError("the CPU LoRA kernel is not available (see the logged build warning)")
    return fn()

build = _ADD.build  # (isa) -> Path: compiled, runnable here or not


def add_lora_sparse(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    scale: torch.Tensor,
    rank: torch.Tensor,
    slots: torch.Tensor,
    *,
    isa: str | None = None,
) -> None:
    """Add each token's low-rank term into ``y`` in place (CPU, fp32, bf16, or fp32 with bf16 weights).

    Shapes: ``y [T, d_out]`` and ``x [T, d_in]`` with unit column stride (any
    row stride, so ``y`` may be a column slice of a wider output);
    ``a [S, R, d_in]``, ``bt [S, R, d_out]`` (B transposed), ``scale [S]``
    float32, ``rank [S]`` int32 and ``slots [T]`` int32, all contiguous.
    Dtypes: ``x`` and ``y`` share one dtype and ``a`` and ``bt`` another, one
    of (activations, weights) = (float32, float32), (bfloat16, bfloat16), or
    (float32, bfloat16), the last reading half the adapter bytes.

    Semantics::

        for t in range(T):
            s = slots[t]
            if s < 0 or rank[s] == 0: continue       # exactly zero contribution
            r = rank[s]
            y[t] += scale[s] * (x[t] @ a[s, :r].T) @ bt[s, :r]

    Accumulated in fp32 (bf16 weights widen exactly, so the mixed case is
    the fp32 result on ``a.float()``, ``bt.float()``); bf16 ``y`` is rounded
    to nearest even once, when stored. Raises ValueError on bad arguments
    (checked before ``y`` is touched). ``isa`` picks a build other than this
    CPU's best (tests compare them).
    """
    fn = _ADD.get(isa)
    if fn is None:
        raise RuntimeError("the CPU LoRA kernel is not available (see the logged build warning)")
    code = _DT_CODES.get((x.dtype, a.dtype))
    if code is None or y.dtype is not x.dtype or bt.dtype is not a.dtype:
        raise ValueError(
            "expected x, y and a, bt as float32/float32, bfloat16/bfloat16 or float32/bfloat16 "
            f"(x and y alike, a and bt alike); got x {x.dtype}, y {y.dtype}, a {a.dtype}, bt {bt.dtype}"
        )
    if not (scale.dtype is _F32 and rank.dtype is _I32 and slots.dtype is _I32):
        raise ValueError(
            f"expected scale float32, rank and slots int32; got scale {scale.dtype}, rank {rank.dtype}, "
            f"slots {slots.dtype}"
        )
    if not (y.is_cpu and x.is_cpu and a.is_cpu and bt.is_cpu and scale.is_cpu and rank.is_cpu and slots.is_cpu):
        raise ValueError("all tensors must be on the CPU")
    try:
        t, d_in = x.shape
        t_y, d_out = y.shape
        s, r, d_in_a = a.shape
        s_bt, r_bt, d_out_bt = bt.shape
        (s_scale,) = scale.shape
        (s_rank,) = rank.shape
        (t_slots,) = slots.shape
    except ValueError:
        raise ValueError(_shape_message(y, x, a, bt, scale, rank, slots)) from None
    if (
        t_y != t
        or t_slots != t
        or d_in_a != d_in
        or d_out_bt != d_out
        or s_bt != s
        or r_bt != r
        or s_scale != s
        or s_rank != s
    ):
        raise ValueError(_shape_message(y, x, a, bt, scale, rank, slots))
    ldx, x_col = x.stride()
    ldy, y_col = y.stride()
    if (x_col != 1 and d_in > 1) or (y_col != 1 and d_out > 1) or (ldy < d_out and t > 1):
        raise ValueError(
            f"x and y need unit column stride and y rows that do not overlap, got strides {x.stride()} and {y.stride()}"
        )
    if not (
        a.is_contiguous()
        and bt.is_contiguous()
        and scale.is_contiguous()
        and rank.is_contiguous()
        and slots.is_contiguous()
    ):
        raise ValueError("a, bt, scale, rank and slots must be contiguous")
    err = fn(
        _pack(
            code,
            y.data_ptr(),
            ldy,
            x.data_ptr(),
            ldx,
            a.data_ptr(),
            bt.data_ptr(),
            scale.data_ptr(),
            rank.data_ptr(),
            slots.data_ptr(),
            t,
            d_in,
            d_out,
            s,
            r,
            torch.get_num_threads(),
        )
    )
    if err:
        raise ValueError(f"add_lora_sparse: {_ERRORS.get(err, f'error {err}')}")


def _shape_message(*tensors: torch.Tensor) -> str:
    names = ("y", "x", "a", "bt", "scale", "rank", "slots")
    shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, tensors, strict=True))
    want = "y [T, d_out], x [T, d_in], a [S, R, d_in], bt [S, R, d_out], scale [S], rank [S], slots [T]"
    return f"expected {want}; got {shapes}"
