"""Paged decode attention on CPU (fp32, or bf16 computed in fp32) with our C kernel: keys and values read in
place, no gather."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from server.native import NativeFunction, NativeLibrary

# Built once per ISA level (server.native); the compiler vectorises the loops for each.
_HERE = Path(__file__).parent
_LIB = NativeLibrary(_HERE / "_decode_attention.c", "decode_attention", ("-ffp-contract=fast",),
                     depends=(_HERE / "_bf16.h",))
_ARGTYPES = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [ctypes.c_float, ctypes.c_float, ctypes.c_int]
_ATTEND = NativeFunction(_LIB, "loraplex_decode_attention_f32", _ARGTYPES)
_ATTEND_BF16 = NativeFunction(_LIB, "loraplex_decode_attention_bf16", _ARGTYPES)
_ENTRIES = {torch.float32: _ATTEND, torch.bfloat16: _ATTEND_BF16}

available = _ATTEND.available  # (isa=None) -> bool: built and loaded on first call

build = _ATTEND.build  # (isa) -> Path: compiled, runnable here or not


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    index: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    softcap: float | None = None,
    *,
    isa: str | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged context.

    ``q [B, H, D]`` fp32 or bf16 contiguous; ``k_cache``/``v_cache`` ``[N, KV, D]``
    contiguous, of q's dtype (bf16 is widened and computed in fp32, the output rounded once);
    ``index [B, Lmax]`` int64 flat cache positions; ``lengths [B]`` int32, each in ``1..Lmax``.
    Returns ``[B, H, D]`` of q's dtype::

        out[b, h] = softmax(scale * q[b, h] @ K[index[b, :len_b], h // (H // KV)].T) @ V[...]

    with the scores soft-capped to ``softcap * tanh(scores / softcap)`` first when ``softcap`` is given.

    ``isa`` picks a build other than this CPU's best (tests compare them).
    """
    entry = _ENTRIES.get(q.dtype)
    if entry is None or k_cache.dtype is not q.dtype or v_cache.dtype is not q.dtype:
        raise ValueError(f"decode attention takes fp32 or bf16 q and caches of its dtype, got {q.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    fn = entry.get(isa)
    if fn is None:
        raise RuntimeError("the decode attention kernel is not available")
    b, h, d = q.shape
    n, kv, _ = k_cache.shape
    out = torch.empty_like(q)
    err = fn(
        out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), index.data_ptr(),
        lengths.data_ptr(), b, h, kv, d, index.shape[1], n, scale, softcap or 0.0, torch.get_num_threads(),
    )
    if err:
        raise ValueError(f"decode attention kernel failed with error {err}")
    return out
