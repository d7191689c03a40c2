"""Tiny random models, a tiny tokenizer, and PEFT adapters made in the test itself."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a multi adapter lora server batches many adapters into one forward pass",
    "hello world, this is a tiny tokenizer for tests of loraplex",
    "numbers 0 1 2 3 4 5 6 7 8 9 and punctuation . , ; : ! ?",
] * 4

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "llama3": (LlamaConfig, LlamaForCausalLM),  # Llama 3.1's rope scaling
    "phi3": (Phi3Config, Phi3ForCausalLM),  # fused qkv_proj and gate_up_proj
    "phi4mini": (Phi3Config, Phi3ForCausalLM),  # and longrope, partial rotary (Phi-3.5 / Phi-4-mini 128k)
    "gemma": (GemmaConfig, GemmaForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM),
    "granite": (GraniteConfig, GraniteForCausalLM),
    "smollm3": (SmolLM3Config, SmolLM3ForCausalLM),
}
# Families whose norms scale by 1 + weight (their weights are randomized around 0 rather than 1).
OFFSET_NORMS = ("gemma", "gemma2", "gemma3_text")
# A spec's split targets as a fused family names them (an adapter for Phi-3 targets qkv_proj, gate_up_proj).
FUSED_TARGETS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                 "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
# Config fields of a test architecture beyond the shared tiny sizes.
ARCHITECTURE_EXTRAS: dict[str, dict] = {
    "qwen3": {"head_dim": 16},  # its default is 128
    "phi3": {"pad_token_id": None},  # its default (32000) is outside a tiny vocabulary
    "llama3": {
        "rope_parameters": {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        }
    },
    # Phi-4-mini's rope: longrope (the long factors past 8 tokens here: prompts and decodes cross it) on 3/4 of
    # each 16-value head.
    "phi4mini": {"pad_token_id": None, "original_max_position_embeddings": 8, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.75,
        "original_max_position_embeddings": 8, "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
        "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]}},
    "gemma": {"head_dim": 16},
    # A window of 8 (prompts and decodes here run past it), alternate layers windowed; soft-caps small enough to
    # change the scores and logits of a tiny model.
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 8, "attn_logit_softcapping": 1.0,
               "final_logit_softcapping": 5.0},
    # Gemma 3 4B+'s rope: linear scaling on the global layers, a local base on the windowed ones.
    "gemma3": {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 8, "sliding_window_pattern": 2,
               "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    "granite": {"embedding_multiplier": 2.0, "attention_multiplier": 0.3, "residual_multiplier": 0.5,
                "logits_scaling": 2.0},
    "smollm3": {"no_rope_layer_interval": 2, "use_sliding_window": True, "sliding_window": 8, "pad_token_id": None,
                "bos_token_id": None},
}


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def make_model(arch: str, vocab: int, seed: int = 0, layers: int = 2, **extras) -> PreTrainedModel:
    """A tiny random model of ``arch``; ``extras``: config fields over :data:`ARCHITECTURE_EXTRAS`'."""
    config_cls, model_cls = ARCHITECTURES[arch]
    fields = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,  # peaky logits, so greedy choices are not near-ties
        tie_word_embeddings=False,
        eos_token_id=0,
    )
    config = config_cls(**{**fields, **ARCHITECTURE_EXTRAS.get(arch, {}), **extras})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # q/k norms start as ones, Gemma's norms as zeros (they scale by 1 + w): make them matter
        offset = config.model_type in OFFSET_NORMS
        for name, p in model.named_parameters():
            if offset and name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    return model


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    r: int
    alpha: float
    targets: tuple[str, ...]
    rslora: bool = False
    rank_pattern: dict | None = None


def make_adapter(base: PreTrainedModel, spec: AdapterSpec, folder: Path, seed: int, std: float = 0.3) -> Path:
    """A PEFT LoRA adapter with random (non-zero) A and B, saved in PEFT's format."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base), _lora_config(spec, base.config.model_type))
    _randomize(peft_model, std)
    out = folder / spec.name
    peft_model.save_pretrained(out)
    return out


def tiny_base_with_adapter(folder: Path) -> tuple[PreTrainedTokenizerFast, PreTrainedModel, Path]:
    """The tiny tokenizer and Llama most API tests serve, and a rank-8 q/v adapter "good" saved under ``folder``."""
    tok = make_tokenizer()
    base = make_model("llama", len(tok), seed=5)
    return tok, base, make_adapter(base, AdapterSpec("good", 8, 16, ("q_proj", "v_proj")), folder, seed=1)


def make_adapters(
    base: PreTrainedModel,
    spec: AdapterSpec,
    folder: Path,
    seeds: dict[str, int],
    std: float = 0.3,
    on_saved: Callable[[int], object] | None = None,
) -> list[Path]:
    """Many adapters of ``spec``'s shape, one per name in ``seeds``, each with random A and B from its seed.

    One PEFT wrap of ``base`` serves them all (only the LoRA values change between saves), so
    the values differ from :func:`make_adapter`'s for the same seed. ``on_saved(count)`` is
    called after each save (for progress).
    """
    peft_model = get_peft_model(copy.deepcopy(base), _lora_config(spec, base.config.model_type))
    paths = []
    for name, seed in seeds.items():
        torch.manual_seed(seed)
        _randomize(peft_model, std)
        paths.append(folder / name)
        peft_model.save_pretrained(paths[-1])
        if on_saved:
            on_saved(len(paths))
    return paths


def _lora_config(spec: AdapterSpec, model_type: str = "llama") -> LoraConfig:
    fused = FUSED_TARGETS if model_type == "phi3" else {}  # Phi-3 and Phi-4-mini
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        target_modules=sorted({fused.get(t, t) for t in spec.targets}),
        use_rslora=spec.rslora,
        rank_pattern={fused.get(k, k): v for k, v in (spec.rank_pattern or {}).items()},
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )


def _randomize(peft_model, std: float) -> None:
    with torch.no_grad():  # B starts at zero in some PEFT versions: make both random and sizeable
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, std)


MIXED_ADAPTERS = (
    AdapterSpec("all-r8", 8, 16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    AdapterSpec("attn-r4", 4, 8, ("q_proj", "v_proj")),
    AdapterSpec("mlp-r16", 16, 8, ("gate_proj", "up_proj", "down_proj")),
    AdapterSpec("rslora-r12", 12, 6, ("q_proj", "k_proj", "o_proj", "down_proj"), rslora=True),
    AdapterSpec("r1", 1, 2, ("v_proj", "up_proj")),
    AdapterSpec("r3-pattern", 3, 5, ("q_proj", "o_proj", "gate_proj"), rank_pattern={"o_proj": 6}),
)


def edit_adapter(folder: Path, tensors: Callable[[dict], object] | None = None, config=None) -> Path:
    """Edit a saved adapter in place: ``tensors`` and ``config`` are called on the loaded dicts, then saved back."""
    if tensors:
        t = load_file(folder / "adapter_model.safetensors")
        tensors(t)
        save_file(t, folder / "adapter_model.safetensors")
    if config:
        c = json.loads((folder / "adapter_config.json").read_text())
        config(c)
        (folder / "adapter_config.json").write_text(json.dumps(c))
    return folder
