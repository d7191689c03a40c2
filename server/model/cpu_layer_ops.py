"""RMSNorm and RoPE for fp32 and bf16 CPU steps with our C code (``_layer_ops.c``): one call where torch runs a
chain (bf16 with transformers' roundings, so the same bits as the torch ops they replace).

A decode step of a 30-layer model runs 61 norms and 30 rotations; torch's ``F.rms_norm`` and the
rotate-half RoPE cost ~40 us and ~45 us each on a 2-core CPU (mostly dispatch of ~10 small ops),
~3.5 ms of a ~22 ms quantized step (torch profiler, SmolLM2-135M, Zen 3). These do the same
arithmetic in one call each.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F

from server.native import NativeFunction, NativeLibrary

_HERE = Path(__file__).parent
_LIB = NativeLibrary(
    _HERE / "_layer_ops.c", "layer_ops", cflags=("-ffp-contract=off",),
    depends=(_HERE.parent / "lora" / "_lora_vec.h", _HERE / "_bf16.h"),
)
_P, _I = ctypes.c_void_p, ctypes.c_int64
_RMS_NORM = NativeFunction(_LIB, "loraplex_rms_norm", [_P, _P, _I, _P, _I, _I, ctypes.c_float])
_ROPE = NativeFunction(_LIB, "loraplex_rope", [_P, _I, _P, _P, _P, _I, _I, _I, _I, _I])
_RMS_NORM_BF16 = NativeFunction(_LIB, "loraplex_rms_norm_bf16", [_P, _P, _I, _P, _I, _I, ctypes.c_float])
_ROPE_BF16 = NativeFunction(_LIB, "loraplex_rope_bf16", [_P, _I, _P, _P, _P, _I, _I, _I, _I, _I])
_NORMS = {torch.float32: _RMS_NORM, torch.bfloat16: _RMS_NORM_BF16}
_ROPES = {torch.float32: _ROPE, torch.bfloat16: _ROPE_BF16}
DTYPES = tuple(_NORMS)

available = _RMS_NORM.available  # (isa=None) -> bool

build = _RMS_NORM.build  # (isa) -> Path


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, isa: str | None = None) -> torch.Tensor:
    """RMSNorm of CPU ``x [T, K]`` (unit column stride) by contiguous ``weight`` of x's dtype: fp32 as
    ``F.rms_norm(x, (K,), weight, eps)``; bf16 as transformers computes it (normalized in fp32, rounded to bf16,
    times ``weight``, rounded again)."""
    entry = _NORMS.get(x.dtype)
    fn = None if entry is None else entry.get(isa)
    if fn is None or x.dim() != 2 or x.stride(1) != 1 or not x.is_cpu or weight.dtype is not x.dtype:
        return torch_rms_norm(x, weight, eps)
    t, k = x.shape
    y = torch.empty(t, k, dtype=x.dtype)
    _check(fn(y.data_ptr(), x.data_ptr(), x.stride(0), weight.data_ptr(), t, k, eps))
    return y


def torch_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm arithmetic in torch ops: normalized in fp32, rounded to x's dtype, then scaled by
    ``w`` (in bf16 a second rounding that a fused norm would not make)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def rms_norm_fp32_weight(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's and OLMo 2's RMSNorm arithmetic: normalized in fp32, times the fp32 weight ``w``, rounded to x's
    dtype once."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w).to(x.dtype)


def rope_(
    qkv: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
    *, isa: str | None = None,
) -> None:
    """Rotate the first ``heads`` heads of each row of ``qkv [T, width]`` (fp32 or bf16, unit column stride) in
    place, by the ``cos``/``sin`` tables ``[max_positions, rot_dim]`` (contiguous, qkv's dtype) at
    ``positions [T]`` (int64): the first ``rot_dim`` values of each head (all of them, or a partial rotary
    factor's share), the rest unchanged."""
    entry = _ROPES.get(qkv.dtype)
    if entry is None or cos.dtype is not qkv.dtype or sin.dtype is not qkv.dtype:
        raise ValueError(f"RoPE takes fp32 or bf16 rows and tables of their dtype, got {qkv.dtype}, {cos.dtype}")
    fn = entry.get(isa)
    if fn is None:
        raise RuntimeError("the layer-ops kernel is not available")
    _check(fn(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), positions.data_ptr(), qkv.shape[0],
              heads, head_dim, cos.shape[1], cos.shape[0]))


def _check(err: int) -> None:
    if err:
        raise ValueError(f"layer-ops kernel failed with error {err}")
