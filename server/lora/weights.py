"""An adapter's matrices in host memory, as the loader thread reads them and slots copy them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adapters_store.peft_format import AdapterBinding, AdapterManifest
from adapters_store.tensors import read_tensors


@dataclass(frozen=True)
class AdapterWeights:
    """Host copies of one adapter's matrices, in the dtype they were stored in.

    Casting to the slot dtype happens in the copy into a slot, on the engine thread.
    """

    a: dict[str, torch.Tensor]  # module -> A [r, d_in]
    bt: dict[str, torch.Tensor]  # module -> B^T [r, d_out], contiguous, as the slots hold it
    scale: dict[str, float]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.bt.values()))

    def pinned(self) -> AdapterWeights:
        """The same matrices in page-locked host memory, so copies into CUDA slots are asynchronous."""
        return AdapterWeights(
            a={k: t.pin_memory() for k, t in self.a.items()},
            bt={k: t.pin_memory() for k, t in self.bt.items()},
            scale=self.scale,
        )


def load_weights(folder: Path, manifest: AdapterManifest, binding: AdapterBinding) -> AdapterWeights:
    """Read the tensors ``binding`` names (checked finite) without running a torch op.

    Only numpy (B is transposed here, so activating a slot, on the engine thread, is a
    plain copy) and zero-copy views: a torch op on the loader thread would give that
    thread an OpenMP team and slow the engine thread's parallel ops.
    """
    keys = [k for m in binding.modules for k in (m.a_key, m.b_key)]
    arrays = read_tensors(folder, manifest, keys)
    bf16 = {k for k in keys if manifest.tensors[k].dtype == "BF16"}

    def tensor(key: str, transpose: bool = False) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(arrays[key].T) if transpose else arrays[key])
        return t.view(torch.bfloat16) if key in bf16 else t

    return AdapterWeights(
        a={m.module: tensor(m.a_key) for m in binding.modules},
        bt={m.module: tensor(m.b_key, transpose=True) for m in binding.modules},
        scale={m.module: m.scale for m in binding.modules},
    )
