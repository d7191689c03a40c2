"""What differs between the decoder families the lean forward pass serves, declared once.

Every family here is a pre-norm decoder with RMSNorm, rotary positions, grouped-query attention over
q/k/v/o projections and a gated SiLU MLP (gate/up/down). They differ in:

* ``qkv_bias``: q/k/v projections with biases always (Qwen2), or never (the config's ``attention_bias``
  must then be false);
* ``qk_norm``: an RMSNorm over each head of q and of k, after the projections (and their LoRA terms) and
  before RoPE (Qwen3);
* ``fused``: q/k/v in one ``qkv_proj`` module and gate/up in one ``gate_up_proj`` (Phi-3): the modules
  PEFT adapters for these models target, so an adapter's LoRA adds into the whole fused output;
* ``sliding_window``: where the config's window applies (``use_sliding_window`` for the Qwen families;
  Mistral's ``sliding_window`` always). The server caps a sequence at the window, so no layer of a
  windowed model (whichever of its layers the window applies to) ever attends past it.

A config value the forward pass does not implement (an activation, a rope type, biases where the family
has none) is refused by :func:`server.model.architecture.ModelShape.from_config`,
naming it: the server never serves silently different arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    qkv_bias: bool = False
    qk_norm: bool = False
    fused: bool = False
    window_flag: str | None = None  # the config field that switches the sliding window on (None: always on)


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(qkv_bias=True, window_flag="use_sliding_window"),
    "qwen3": Family(qk_norm=True, window_flag="use_sliding_window"),
    "phi3": Family(fused=True),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

# Rotary embeddings over the whole head (a partial_rotary_factor below 1 is refused) whose cos/sin at a
# position do not depend on the sequence's length: the forward pass computes them once for every position
# with transformers' own rotary module. ("dynamic" and "longrope" rescale with the running length, so they
# are refused.)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
