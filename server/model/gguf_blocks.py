"""A GGUF file's block-quantized tensors, unpacked to integer codes and per-block scales (not to floats).

GGML stores a quantized matrix ``[N, K]`` row by row in blocks of 32 values
along ``K``. The block types read here, and the value of code ``q``:

* ``Q4_0``: fp16 scale ``d``, 32 4-bit codes;            value ``d * (q - 8)``
* ``Q4_1``: fp16 scale ``d``, fp16 minimum ``m``, codes;  value ``d * q + m``
* ``Q8_0``: fp16 scale ``d``, 32 signed 8-bit codes;     value ``d * q``

A 4-bit block packs code ``j`` in the low nibble of byte ``j`` and code
``j + 16`` in its high nibble. Other tensor types are skipped and left to the
dequantized copy transformers made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BLOCK = 32
_LAYOUTS = {"Q4_0": (18, False), "Q4_1": (20, True), "Q8_0": (34, False)}  # bytes per block, has minimum


@dataclass(frozen=True)
class BlockQuantized:
    """One matrix ``[N, K]`` in 32-value blocks: ``value = scale * (code - offset) + minimum``."""

    kind: str  # a GGML type name: Q4_0, Q4_1 or Q8_0
    codes: torch.Tensor  # Q8_0: [N, K] int8; 4-bit: [N, K / 2] uint8, the blocks' bytes as stored
    scales: torch.Tensor  # [N, K / 32] float32
    minimums: torch.Tensor | None  # [N, K / 32] float32 (Q4_1), else None
    k: int

    @property
    def bits(self) -> int:
        return 8 if self.kind == "Q8_0" else 4

    @property
    def offset(self) -> int:
        return 8 if self.kind == "Q4_0" else 0

    def dequantize(self) -> torch.Tensor:
        """The float32 values, as GGML computes them (``d * q (+ m)`` per value)."""
        n, k = self.codes.shape[0], self.k
        q = self.codes
        if self.bits == 4:  # byte j of a block: code j (low nibble), code j + 16 (high nibble)
            b = q.view(n, k // BLOCK, BLOCK // 2)
            q = torch.cat([b & 0x0F, b >> 4], dim=-1)
        q = (q.view(n, k // BLOCK, BLOCK).to(torch.int32) - self.offset).float()
        w = self.scales.unsqueeze(-1) * q
        if self.minimums is not None:
            w = w + self.minimums.unsqueeze(-1)
        return w.view(n, k)

    def take_rows(self, rows: torch.Tensor) -> BlockQuantized:
        """The same matrix with its rows reordered (``rows`` indexes the output dimension)."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, rows).contiguous()

        return BlockQuantized(self.kind, pick(self.codes), pick(self.scales), pick(self.minimums), self.k)


def unpack(kind: str, raw: np.ndarray, shape: tuple[int, int]) -> BlockQuantized:
    """Split the raw bytes ``[N, K / 32 * block_bytes]`` of a ``kind`` tensor of ``shape`` ``(N, K)`` into codes,
    scales and minimums."""
    size, has_min = _LAYOUTS[kind]
    n, k = shape
    if k % BLOCK:
        raise ValueError(f"a {kind} row of {k} values is not a whole number of {BLOCK}-value blocks")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // BLOCK, size)

    def halves(at: int) -> torch.Tensor:
        return torch.from_numpy(blocks[..., at : at + 2].copy().view(np.float16)[..., 0].astype(np.float32))

    body = blocks[..., 4 if has_min else 2 :].reshape(n, -1)
    codes = torch.from_numpy(body.view(np.int8) if kind == "Q8_0" else body.copy())
    return BlockQuantized(kind, codes.contiguous(), halves(0), halves(2) if has_min else None, k)


def read_quantized(path: Path) -> tuple[str | None, dict[str, BlockQuantized]]:
    """The GGUF file's architecture name and every Q4_0 / Q4_1 / Q8_0 matrix in it, by GGUF tensor name."""
    import gguf  # the loader of GGUF files for transformers; only needed here

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    out: dict[str, BlockQuantized] = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind in _LAYOUTS and len(tensor.shape) == 2:
            k, n = (int(d) for d in tensor.shape)  # GGUF lists the fastest-moving dimension first
            out[tensor.name] = unpack(kind, tensor.data, (n, k))
    return arch, out
