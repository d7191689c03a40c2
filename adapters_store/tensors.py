"""Load a bound adapter's tensors into host memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from adapters_store.errors import InvalidAdapter
from adapters_store.peft_format import WEIGHTS_FILE, AdapterBinding


@dataclass(frozen=True)
class AdapterWeights:
    """Host copies of one adapter's matrices, ready to be copied into device slots."""

    a: dict[str, torch.Tensor]  # module -> [r, d_in]
    b: dict[str, torch.Tensor]  # module -> [d_out, r]
    scale: dict[str, float]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))


def load_weights(folder: Path, binding: AdapterBinding, dtype: torch.dtype) -> AdapterWeights:
    """Read the tensors named by ``binding``, refuse NaN/Inf, cast to ``dtype``."""
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    with safe_open(folder / WEIGHTS_FILE, framework="pt") as f:
        for m in binding.modules:
            for key, out in ((m.a_key, a), (m.b_key, b)):
                t = f.get_tensor(key)
                if not torch.isfinite(t).all():
                    raise InvalidAdapter(f"tensor {key!r} contains NaN or Inf")
                out[m.module] = t.to(dtype).contiguous()
    return AdapterWeights(a=a, b=b, scale={m.module: m.scale for m in binding.modules})
