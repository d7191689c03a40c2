"""What a benchmark ran on, recorded beside its figures: the CPU model, the ISA our kernels use, its SIMD flags."""

from __future__ import annotations

import os

from server import native

# The flags that decide which kernels and torch paths a CPU gets.
SIMD_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "avx_vnni", "asimd", "sve")


def machine() -> dict:
    """``{"cpu", "isa", "simd_flags", "cpu_count"}``: ``isa`` is the build of our C kernels this CPU runs."""
    flags = native.cpu_flags()
    return {
        "cpu": native.cpu_model(),
        "isa": native.cpu_isa(),
        "simd_flags": [f for f in SIMD_FLAGS if f in flags],
        "cpu_count": os.cpu_count(),
    }
