"""Base weights kept quantized on the CPU: integer codes with per-group fp32 scales, multiplied by our kernel.

Formats, with ``value = scale * (code - offset) (+ minimum)`` per group of values of a row:

* ``int8``: per output channel (one scale per row), symmetric; made here from fp32 weights
  (``--quantization int8``);
* ``int4``: 32-value groups with a scale and a minimum (GGML's Q4_1 layout); made here from fp32
  weights (``--quantization int4``);
* a GGUF file's own ``Q8_0`` / ``Q4_0`` / ``Q4_1`` tensors, served as stored (no requantization).

Adapters stay full precision: only the frozen base projections are quantized (QLoRA's setting).
Activations stay fp32; decode-sized steps run the kernel on the codes, longer steps (prefill)
dequantize into a scratch fp32 matrix and use torch's matrix product. Both see the same fp32 values,
the ones GGML's dequantization writes out. With ``--activations int8`` (``int8_activations``) steps of
a few tokens instead quantize the activations to 8 bits per 32-value block and take integer dot
products, as llama.cpp does: faster, and no longer the exact product of the dequantized weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from server.model import cpu_gemv
from server.model.gguf_blocks import BLOCK, BlockQuantized

SCHEMES = ("int8", "int4")
_FORMAT = "1"  # of save_matrices' files; a file of another format is not read
# Steps up to this many tokens run on the codes (each tile of rows dequantized once into L1, then every token);
# longer ones (prefill) on a dequantized copy of the whole matrix and torch's GEMM.
KERNEL_TOKENS = 64


@dataclass(frozen=True)
class QuantizedMatrix:
    """A weight ``[N, K]`` as codes (``int8 [N, K]`` or packed 4-bit ``uint8 [N, K / 2]``) and group scales."""

    kind: str  # "int8", "int4", or the GGUF type it came from (Q8_0, Q4_0, Q4_1)
    mode: int  # cpu_gemv.W_I8 or cpu_gemv.W_U4
    codes: torch.Tensor
    scales: torch.Tensor  # [N, groups] fp32
    mins: torch.Tensor | None  # [N, groups] fp32
    group: int  # values per scale
    offset: float  # subtracted from codes before scaling
    k: int
    int8_activations: bool = False  # short steps on 8-bit activations (a serving choice; not saved with the codes)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.k)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.mins is None else self.mins.nbytes
        return self.codes.nbytes + self.scales.nbytes + extra

    def linear(self, x: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[0] <= KERNEL_TOKENS:
            return cpu_gemv.quantized_linear(
                x, self.codes, self.mode, self.scales, self.mins, self.group, self.offset, self.k, b,
                int8_activations=self.int8_activations,
            )
        return F.linear(x, self.dequantize(), b)

    def dequantize(self) -> torch.Tensor:
        return cpu_gemv.dequantize(self.codes, self.mode, self.scales, self.mins, self.group, self.offset, self.k)


def from_blocks(q: BlockQuantized) -> QuantizedMatrix:
    """A GGUF tensor's blocks, as stored: Q8_0 as 8-bit codes, Q4_0 / Q4_1 as their packed 4-bit bytes."""
    mode = cpu_gemv.W_I8 if q.bits == 8 else cpu_gemv.W_U4
    return QuantizedMatrix(q.kind, mode, q.codes, q.scales.contiguous(), q.minimums, BLOCK, float(q.offset), q.k)


def quantize(w: torch.Tensor, scheme: str) -> QuantizedMatrix:
    """Quantize an fp32 weight ``[N, K]``: ``int8`` per channel (round to nearest, scale = max|w| / 127) or
    ``int4`` in 32-value groups (scale = (max - min) / 15, minimum = min, codes rounded to nearest)."""
    w = w.detach().float().cpu()
    n, k = w.shape
    if scheme == "int8":
        scales = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        codes = torch.round(w / scales).clamp(-127, 127).to(torch.int8)
        return QuantizedMatrix("int8", cpu_gemv.W_I8, codes.contiguous(), scales.contiguous(), None, k, 0.0, k)
    if scheme == "int4":
        if k % BLOCK:
            raise ValueError(f"int4 needs rows that are whole {BLOCK}-value groups; this weight has {k} columns")
        g = w.view(n, k // BLOCK, BLOCK)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        scales = ((hi - lo) / 15).clamp_min(torch.finfo(torch.float32).tiny)
        codes = torch.round((g - lo.unsqueeze(-1)) / scales.unsqueeze(-1)).clamp(0, 15).to(torch.int32).view(n, k)
        return QuantizedMatrix("int4", cpu_gemv.W_U4, _pack_u4(codes), scales.contiguous(), lo.contiguous(), BLOCK,
                               0.0, k)
    raise ValueError(f"unknown quantization scheme {scheme!r} (supported: {', '.join(SCHEMES)})")


def concat_rows(parts: list[QuantizedMatrix]) -> QuantizedMatrix | None:
    """One matrix of the parts' rows stacked (fused q/k/v, gate/up), or None when their formats differ."""
    first = parts[0]
    same = all(
        (p.kind, p.mode, p.group, p.offset, p.k, p.mins is None, p.int8_activations)
        == (first.kind, first.mode, first.group, first.offset, first.k, first.mins is None, first.int8_activations)
        for p in parts
    )
    if not same:
        return None
    mins = None if first.mins is None else torch.cat([p.mins for p in parts])
    return QuantizedMatrix(first.kind, first.mode, torch.cat([p.codes for p in parts]),
                           torch.cat([p.scales for p in parts]), mins, first.group, first.offset, first.k,
                           first.int8_activations)


def save_matrices(matrices: dict[str, QuantizedMatrix], path: Path) -> None:
    """Write ``matrices`` to one safetensors file (atomically: a reader sees the old file or the new one)."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, list] = {}
    for name, m in matrices.items():
        tensors[name + ".codes"], tensors[name + ".scales"] = m.codes, m.scales
        if m.mins is not None:
            tensors[name + ".mins"] = m.mins
        meta[name] = [m.kind, m.mode, m.group, m.offset, m.k]
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"matrices": json.dumps(meta), "format": _FORMAT})
    os.replace(tmp, path)


def load_matrices(path: Path) -> dict[str, QuantizedMatrix]:
    with safe_open(path, "pt") as f:
        header = f.metadata() or {}
    if header.get("format") != _FORMAT:
        raise ValueError(f"format {header.get('format')!r}, not {_FORMAT!r}")
    meta = json.loads(header["matrices"])
    tensors = load_file(path)
    return {
        name: QuantizedMatrix(kind, mode, tensors[name + ".codes"], tensors[name + ".scales"],
                              tensors.get(name + ".mins"), group, offset, k)
        for name, (kind, mode, group, offset, k) in meta.items()
    }


def _pack_u4(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[N, K]`` (0..15) to GGML's block layout: in each 32-value block, byte ``j`` holds code ``j``
    in its low nibble and code ``j + 16`` in its high nibble."""
    n, k = codes.shape
    c = codes.to(torch.uint8).view(n, k // BLOCK, 2, BLOCK // 2)
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(n, k // 2).contiguous()
