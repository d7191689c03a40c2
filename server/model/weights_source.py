"""Where the serving copy of the base weights is read from: a model folder's safetensors files, one tensor at a
time, or a transformers model already in memory (tests, benchmarks).

Reading from the folder never holds the whole file: each tensor is read through its own memory map of the
file, straight into the serving dtype and device. A tensor already in that dtype on the CPU stays backed by
its map (file pages the kernel can drop and read again, as llama.cpp's mmap does), and only its own pages
are ever read; one converted or fused is copied, and its map goes with the original. Host memory while
loading stays at the serving copy plus the tensors being combined.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from transformers import PretrainedConfig, PreTrainedModel

# The file beside a converted GGUF's weights that keeps its checked quantized codes (server.model.quantized_base):
# not one of the model's weights.
QUANTIZED_CACHE = "gguf_quantized.safetensors"


def lm_head_name(config: PretrainedConfig) -> str:
    """The tensor the output projection reads: the input embedding when the config ties them."""
    return "model.embed_tokens.weight" if getattr(config, "tie_word_embeddings", False) else "lm_head.weight"


class TensorSource(Protocol):
    def names(self) -> list[str]:
        """Every tensor it holds."""
        ...

    def get(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The tensor ``name`` (a transformers parameter name) in ``dtype`` on ``device``."""
        ...


class ModuleTensors:
    """A transformers model's own parameters (shared, not copied, where dtype and device already match)."""

    def __init__(self, model: PreTrainedModel) -> None:
        self._params = dict(model.named_parameters(remove_duplicate=False))

    def names(self) -> list[str]:
        return list(self._params)

    def get(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return self._params[name].detach().to(device=device, dtype=dtype)


class FolderTensors:
    """The safetensors files of a model folder (one file, or shards named by ``model.safetensors.index.json``)."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {name: folder / file for name, file in weight_map.items()}
        else:  # model.safetensors; else every safetensors file but the quantized-codes cache kept beside them
            self._files = {}
            single = folder / "model.safetensors"
            files = [single] if single.exists() else sorted(
                f for f in folder.glob("*.safetensors") if f.name != QUANTIZED_CACHE)
            for file in files:
                with safe_open(file, "pt") as f:
                    self._files.update(dict.fromkeys(f.keys(), file))
        if not self._files:
            raise FileNotFoundError(f"{folder}: no safetensors weights")

    def names(self) -> list[str]:
        return list(self._files)

    def get(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        file = self._files.get(name)
        if file is None:
            raise KeyError(f"{name}: not in the model's safetensors files")
        with safe_open(file, "pt") as f:
            return f.get_tensor(name).to(device=device, dtype=dtype)
