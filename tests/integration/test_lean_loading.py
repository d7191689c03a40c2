"""Loading is lean: the serving copy is read from the model's safetensors one tensor at a time, so peak host
memory while loading stays at that copy plus about one layer, and a GGUF file is converted into those
safetensors one tensor at a time (measured in a child process, whose peak resident set is its own)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

SLACK_MB = 32  # allocator and interpreter noise beyond the bound


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A random Llama of ~230 MB in fp32 (8 layers of ~28 MB), saved as transformers does."""
    config = LlamaConfig(vocab_size=8000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False)
    out = tmp_path_factory.mktemp("lean") / "model"
    LlamaForCausalLM(config).save_pretrained(out)
    return out, config


@pytest.mark.parametrize(("dtype", "size"), [("float32", 4), ("bfloat16", 2)])
def test_peak_memory_while_loading_is_the_serving_copy_plus_one_layer(folder, dtype, size):
    path, config = folder
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * h // config.num_attention_heads
    layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two norms
    layer_fp32_mb = layer * 4 / 2**20  # a layer's tensors are read in fp32, then cast
    result = subprocess.run([sys.executable, "-m", "tests.helpers.load_rss", str(path), dtype],
                            capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(result.stdout.strip().splitlines()[-1])
    params = config.num_hidden_layers * layer + 2 * v * h + h  # layers, embedding and lm_head, final norm
    model_mb = params * size / 2**20
    assert got["held_mb"] == pytest.approx(model_mb, rel=0.01)  # the serving copy: the model in that dtype
    assert got["peak_over_baseline_mb"] <= got["held_mb"] + layer_fp32_mb + SLACK_MB, got


def test_converting_a_gguf_holds_one_shard_and_one_tensor_not_the_model(folder, tmp_path):
    """The 230 MB (fp32) model as a GGUF (Q8_0 projections), converted with 16 MB shards: the peak is a shard
    plus a few copies of the largest tensor (dequantized, reordered), far below the model."""
    from transformers import LlamaForCausalLM

    from tests.helpers.gguf_file import write_gguf
    from tests.helpers.tiny import make_tokenizer

    path, _ = folder
    gguf = write_gguf(LlamaForCausalLM.from_pretrained(path), make_tokenizer(), tmp_path / "model.gguf")
    result = subprocess.run([sys.executable, "-m", "tests.helpers.convert_rss", str(gguf), str(tmp_path / "out"),
                             "16"], capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(result.stdout.strip().splitlines()[-1])
    model_mb = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors")) / 2**20
    assert model_mb > 200 and len(list((tmp_path / "out").glob("*.safetensors"))) > 10
    assert got["peak_over_baseline_mb"] <= 16 + 3 * got["largest_tensor_mb"] + SLACK_MB < model_mb * 0.7, got


def test_a_folder_without_safetensors_is_loaded_by_transformers(tmp_path):
    """A pytorch_model.bin-only folder: no lean reader for it, so transformers loads it (and serving reads that)."""
    import torch

    from server.model.loading import load_model
    from server.model.weights_source import FolderTensors, ModuleTensors
    from tests.helpers.tiny_server import save_tiny_model

    folder, model, _ = save_tiny_model(tmp_path / "bin", seed=3)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    loaded = load_model(str(folder), tmp_path / "cache", lean=True)
    assert loaded.hf_model is not None and isinstance(loaded.tensors(), ModuleTensors)
    lean = load_model(str(save_tiny_model(tmp_path / "st", seed=3)[0]), tmp_path / "cache", lean=True)
    assert lean.hf_model is None and isinstance(lean.tensors(), FolderTensors)
