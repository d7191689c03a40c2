"""Resolve ``--model`` to a transformers model and tokenizer.

A local transformers directory loads as it is: for serving (``lean=True``) only its config, tokenizer and a
reader of its safetensors files (the serving copy is read tensor by tensor, see
:mod:`server.model.weights_source`), otherwise as a transformers model (tests and benchmarks use it as a
reference). A ``.gguf`` file (the default model is one) is converted once, tensor by tensor
(:mod:`server.model.gguf_convert`), into a safetensors cache keyed by the file's path, size and mtime, so
later starts take seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from server.model.architecture import ModelShape
from server.model.default_model import DEFAULT_MODEL_NAME, default_gguf_path
from server.model.gguf_convert import INDEX, convert
from server.model.weights_source import FolderTensors, ModuleTensors, TensorSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    hf_model: PreTrainedModel | None  # None when loaded lean: the weights stay in ``source`` until served
    tokenizer: PreTrainedTokenizerBase
    name: str  # the served name of the base model
    source: Path  # the directory the weights were read from
    gguf: Path | None = None  # the GGUF file they were converted from, whose quantized tensors can be served as stored
    config: PretrainedConfig | None = None  # a lean load's config (else hf_model's)
    generation_config: GenerationConfig | None = None  # a lean load's generation config, if the folder has one

    @property
    def model_config(self) -> PretrainedConfig:
        return self.hf_model.config if self.hf_model is not None else self.config

    @property
    def model_generation_config(self) -> GenerationConfig | None:
        return self.hf_model.generation_config if self.hf_model is not None else self.generation_config

    def tensors(self) -> TensorSource:
        """Where the serving copy of the weights is read from."""
        return ModuleTensors(self.hf_model) if self.hf_model is not None else FolderTensors(self.source)


def load_model(model: str | None, cache_dir: Path, *, lean: bool = False) -> LoadedModel:
    """Load the base model (fp32, CPU, eval) from a directory, a GGUF file, or the default. ``lean``: no
    transformers model, only what serving reads (config, tokenizer, the weights' folder)."""
    if model is None:
        gguf = default_gguf_path()
        name = DEFAULT_MODEL_NAME
    else:
        path = Path(model).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--model {model}: no such file or directory")
        if path.is_dir():
            return _load_directory(path, path.name, lean)
        if path.suffix != ".gguf":
            raise ValueError(f"--model {model}: expected a transformers model directory or a .gguf file")
        gguf, name = path, path.stem
    loaded = _load_directory(gguf_cache(gguf, cache_dir), name, lean)
    return dataclasses.replace(loaded, gguf=gguf)


def gguf_cache(gguf: Path, cache_dir: Path) -> Path:
    """Return the safetensors cache of ``gguf``, converting it first if needed (tensor by tensor:
    :mod:`server.model.gguf_convert`)."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists() and any((target / f).exists() for f in ("model.safetensors", INDEX)):
        return target
    log.info("converting %s to a safetensors cache at %s (once)", gguf.name, target)
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    tenth = [0]

    def progress(done: int, total: int) -> None:
        if done * 10 // total > tenth[0]:
            tenth[0] = done * 10 // total
            log.info("conversion: %d of %d tensors (%.0f s)", done, total, time.monotonic() - started)

    try:
        convert(gguf, tmp, progress)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("conversion done in %.1f s", time.monotonic() - started)
    return target


def check_directory(path: Path) -> None:
    """Refuse a model folder whose config the forward pass cannot serve (UnsupportedModel, naming what), from
    its config alone: before the weights load."""
    ModelShape.from_config(AutoConfig.from_pretrained(path))


def _load_directory(path: Path, name: str, lean: bool = False) -> LoadedModel:
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if lean and not any(path.glob("*.safetensors")):  # e.g. pytorch_model.bin only: transformers reads it
        log.info("%s has no safetensors weights: loading it with transformers first", path)
        lean = False
    if lean:
        config = AutoConfig.from_pretrained(path)
        try:
            generation = GenerationConfig.from_pretrained(path)
        except OSError:  # the folder has none
            generation = None
        log.info("read %s's config and tokenizer from %s in %.1f s", name, path, time.monotonic() - started)
        return LoadedModel(None, tokenizer, name, path, config=config, generation_config=generation)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf_model.eval().requires_grad_(False)
    log.info("loaded %s from %s in %.1f s", name, path, time.monotonic() - started)
    return LoadedModel(hf_model=hf_model, tokenizer=tokenizer, name=name, source=path)
