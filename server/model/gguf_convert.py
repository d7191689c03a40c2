"""A GGUF file into a safetensors model folder, one tensor at a time.

transformers reads the GGUF's config, tokenizer and chat template; the tensors are read here one by one with
plain file reads (not through the file's memory map, so the pages read do not stay resident), dequantized by
gguf-py, renamed and reordered by transformers' own per-architecture processor (its q/k row order for Llama,
Gemma's norm offset), and written in shards of at most :data:`SHARD_BYTES` of fp32 with a
``model.safetensors.index.json``. Host memory while converting: one shard plus one tensor, not the model
(transformers' own ``from_pretrained(gguf_file=...)`` holds every dequantized tensor at once).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, dequantize
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    TensorProcessor,
    get_gguf_hf_weights_map,
    read_field,
)

log = logging.getLogger(__name__)

SHARD_BYTES = 128 << 20
INDEX = "model.safetensors.index.json"


def convert(gguf: Path, out: Path, progress: Callable[[int, int], None] | None = None) -> None:
    """Write ``gguf`` as a transformers folder (config, generation config, tokenizer, sharded fp32 safetensors)
    into the existing directory ``out``. ``progress(done, total)`` after each tensor."""
    log.info("conversion 1/2: reading %s's config, tokenizer and chat template (transformers' GGUF reader)", gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    config.architectures, config.dtype = [type(skeleton).__name__], torch.float32  # as save_pretrained writes them
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    wanted = set(skeleton.state_dict())
    log.info("conversion 2/2: the tensors, one at a time")
    reader = GGUFReader(gguf)
    arch = read_field(reader, "general.architecture")[0]
    parsed = {"config": config.to_dict(), "tensors": {}}
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
    names = get_gguf_hf_weights_map(skeleton, processor)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, out / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            shard, shard_bytes = {}, 0

    with gguf.open("rb") as f:
        for done, tensor in enumerate(reader.tensors, 1):
            f.seek(tensor.data_offset)
            raw = np.empty(tensor.n_bytes, dtype=np.uint8)
            f.readinto(memoryview(raw))
            raw = raw.view(tensor.data.dtype).reshape(tensor.data.shape)
            result = processor.process(weights=dequantize(raw, tensor.tensor_type), name=tensor.name,
                                       tensor_key_mapping=names, parsed_parameters=parsed)
            if parsed["tensors"]:
                raise ValueError(f"{gguf.name}: {arch} tensors that transformers regroups are not supported")
            name = names.get(result.name)
            if name is None or name not in wanted:  # e.g. llama.cpp's rope_freqs: transformers skips them too
                continue
            value = torch.from_numpy(np.ascontiguousarray(result.weights, dtype=np.float32))
            shard[name] = value
            shard_bytes += value.nbytes
            total += value.nbytes
            if shard_bytes >= SHARD_BYTES:
                flush()
            if progress:
                progress(done, len(reader.tensors))
    flush()
    missing = wanted - set(weight_map) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing:
        raise ValueError(f"{gguf.name}: no tensor for {', '.join(sorted(missing)[:3])}")
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
