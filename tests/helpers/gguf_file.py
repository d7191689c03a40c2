"""Write a tiny transformers model as a GGUF file the way llama.cpp's converter lays one out (gguf-py's tensor
names and metadata keys, Gemma's norms stored as 1 + w, projections as Q8_0 codes), with a GPT-2 style BPE
tokenizer and a chat template. transformers' own GGUF reader is the check that the layout is right: the tests
compare against the model it reads back, not against this writer."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import quantize
from transformers import PreTrainedModel, PreTrainedTokenizerFast

ARCHS = {"llama": "LLAMA", "qwen3": "QWEN3", "gemma2": "GEMMA2", "gemma3_text": "GEMMA3", "phi3": "PHI3"}
GEMMA = ("gemma2", "gemma3_text")
Q8_SUFFIXES = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "attn_qkv.weight",
               "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")


def write_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: Path) -> Path:
    c = model.config
    arch = getattr(gguf.MODEL_ARCH, ARCHS[c.model_type])
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_context_length(c.max_position_embeddings)
    w.add_block_count(c.num_hidden_layers)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_freq_base(c.rope_parameters.get("rope_theta", 10000.0) if "rope_theta" in c.rope_parameters
                         else c.rope_parameters["full_attention"]["rope_theta"])
    if c.model_type in GEMMA:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_sliding_window(c.sliding_window)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    _tokenizer(w, tokenizer)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert target is not None, f"gguf-py has no name for {name} in {c.model_type}"
        data = tensor.detach().float()
        if c.model_type in GEMMA and name.endswith("norm.weight"):
            data = data + 1  # llama.cpp stores Gemma's norms as the factor itself
        if c.model_type == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
            data = _permute(data, heads)
        array = data.numpy().astype(np.float32)
        if target.endswith(Q8_SUFFIXES):
            w.add_tensor(target, quantize(array, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(target, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tokenizer(w: gguf.GGUFWriter, tok: PreTrainedTokenizerFast) -> None:
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = set(tok.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_bos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.eos_token_id)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def _permute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order for Llama (transformers' reader undoes it)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))
