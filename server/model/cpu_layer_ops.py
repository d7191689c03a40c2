"""RMSNorm and RoPE for fp32 CPU steps with our C code (``_layer_ops.c``): one call where torch runs a chain.

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
    _HERE / "_layer_ops.c", "layer_ops", cflags=("-ffp-contract=off",), depends=(_HERE.parent / "lora" / "_lora_vec.h",)
)
_P, _I = ctypes.c_void_p, ctypes.c_int64
_RMS_NORM = NativeFunction(_LIB, "loraplex_rms_norm", [_P, _P, _I, _P, _I, _I, ctypes.c_float])
_ROPE = NativeFunction(_LIB, "loraplex_rope", [_P, _I, _P, _P, _P, _I, _I, _I, _I])

available = _RMS_NORM.available  # (isa=None) -> bool

build = _RMS_NORM.build  # (isa) -> Path


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, isa: str | None = None) -> torch.Tensor:
    """``F.rms_norm(x, (K,), weight, eps)`` for fp32 CPU ``x [T, K]`` (unit column stride), contiguous ``weight``."""
    fn = _RMS_NORM.get(isa)
    if fn is None or x.dtype is not torch.float32 or x.dim() != 2 or x.stride(1) != 1 or not x.is_cpu:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    t, k = x.shape
    y = torch.empty(t, k, dtype=torch.float32)
    _check(fn(y.data_ptr(), x.data_ptr(), x.stride(0), weight.data_ptr(), t, k, eps))
    return y


def rope_(
    qkv: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
    *, isa: str | None = None,
) -> None:
    """Rotate the first ``heads`` heads of each row of ``qkv [T, width]`` (fp32, unit column stride) in place,
    by the ``cos``/``sin`` tables ``[max_positions, head_dim]`` (fp32 contiguous) at ``positions [T]`` (int64)."""
    fn = _ROPE.get(isa)
    if fn is None:
        raise RuntimeError("the layer-ops kernel is not available")
    _check(fn(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), positions.data_ptr(), qkv.shape[0],
              heads, head_dim, cos.shape[0]))


def _check(err: int) -> None:
    if err:
        raise ValueError(f"layer-ops kernel failed with error {err}")
