"""What differs between the decoder families the lean forward pass serves, declared once.

Every family here is a decoder with RMSNorms, rotary positions, grouped-query attention over q/k/v/o
projections and a gated MLP (``act(gate) * up``, then down). They differ in:

* ``qkv_bias``: q/k/v projections with biases always (Qwen2), or never (the config's ``attention_bias``
  must then be false);
* ``qk_norm``: an RMSNorm of q and of k after the projections (and their LoRA terms), before RoPE: over each
  head (``"head"``: Qwen3, Gemma 3) or over all heads at once (``"all"``: OLMo 2);
* ``fused``: q/k/v in one ``qkv_proj`` module and gate/up in one ``gate_up_proj`` (Phi-3): the modules
  PEFT adapters for these models target, so an adapter's LoRA adds into the whole fused output;
* ``norms``: which RMSNorms a layer has and where (:class:`Norms`): Llama's two pre-norms, Gemma 2/3's
  four (pre and post attention, pre and post MLP), OLMo 2's two post-norms;
* ``norm_offset`` and ``norm_weight_fp32``: Gemma stores each norm's weight as ``w - 1``; Gemma and OLMo 2
  multiply the normalized row by the weight in fp32 and round once (Llama rounds, then multiplies);
* ``activation_field``: the config field naming the MLP activation (any of :data:`ACTIVATIONS`);
* ``embed_sqrt_hidden``: the embedding lookup times ``sqrt(hidden_size)`` (Gemma);
* ``query_pre_attn_scalar``: attention scores scaled by ``query_pre_attn_scalar ** -0.5`` rather than
  ``head_dim ** -0.5`` (Gemma 2/3);
* ``softcapping``: ``cap * tanh(x / cap)`` on attention scores and final logits, caps from the config's
  ``attn_logit_softcapping`` and ``final_logit_softcapping`` (Gemma 2; Gemma 3's are off by default);
* ``multipliers``: Granite's ``embedding_multiplier``, ``attention_multiplier`` (the score scale),
  ``residual_multiplier`` (on each branch before the residual add) and ``logits_scaling`` (divides logits);
* ``window``: which layers attend only to the last ``sliding_window`` positions: ``"all"`` of them when the
  config sets a window (Mistral, Phi-3), those the config's ``layer_types`` call ``sliding_attention`` (Qwen2/3,
  Gemma 2/3, SmolLM3), or ``"none"``;
* ``rope_per_layer_type``: separate rotary tables for sliding and full layers (Gemma 3's local base);
* ``no_rope_layers``: the config's ``no_rope_layers`` list turns RoPE off in some layers (SmolLM3);
* ``partial_rotary``: a ``partial_rotary_factor`` below 1 rotates only that share of each head (Phi-4-mini's
  0.75; transformers implements it for these families only).

A config value the forward pass does not implement (an activation, a rope type, biases where the family
has none) is refused by :func:`server.model.architecture.ModelShape.from_config`, and a weight file tensor
it would not read by :class:`server.model.decoder.CausalLM`, naming it: the server never serves silently
different arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Norms:
    """A layer's RMSNorms by where they apply, as transformers names them under ``model.layers.N``; None: none
    there."""

    attn_in: str | None = "input_layernorm"
    attn_out: str | None = None  # on the attention output, before the residual add
    mlp_in: str | None = "post_attention_layernorm"
    mlp_out: str | None = None  # on the MLP output, before the residual add

    def placed(self) -> tuple[tuple[str, str], ...]:
        """``(position, tensor name)`` of each norm the layer has."""
        at = (("attn_in", self.attn_in), ("attn_out", self.attn_out), ("mlp_in", self.mlp_in),
              ("mlp_out", self.mlp_out))
        return tuple((where, name) for where, name in at if name)


PRE_NORMS = Norms()
SANDWICH_NORMS = Norms(  # Gemma 2/3
    attn_out="post_attention_layernorm", mlp_in="pre_feedforward_layernorm", mlp_out="post_feedforward_layernorm"
)
POST_NORMS = Norms(  # OLMo 2
    attn_in=None, attn_out="post_attention_layernorm", mlp_in=None, mlp_out="post_feedforward_layernorm"
)


@dataclass(frozen=True)
class Family:
    qkv_bias: bool = False
    qk_norm: str | None = None  # "head" or "all"
    fused: bool = False
    norms: Norms = PRE_NORMS
    norm_offset: float = 0.0
    norm_weight_fp32: bool = False
    activation_field: str = "hidden_act"
    embed_sqrt_hidden: bool = False
    query_pre_attn_scalar: bool = False
    softcapping: bool = False
    multipliers: bool = False
    window: str = "none"  # "all", "layer_types" or "none"
    rope_per_layer_type: bool = False
    no_rope_layers: bool = False
    partial_rotary: bool = False


_GEMMA = Family(norm_offset=1.0, norm_weight_fp32=True, embed_sqrt_hidden=True)
_GEMMA2 = Family(
    norm_offset=1.0, norm_weight_fp32=True, embed_sqrt_hidden=True, norms=SANDWICH_NORMS,
    activation_field="hidden_activation", query_pre_attn_scalar=True, softcapping=True, window="layer_types",
)

FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(window="all"),
    "qwen2": Family(qkv_bias=True, window="layer_types"),
    "qwen3": Family(qk_norm="head", window="layer_types"),
    "phi3": Family(fused=True, window="all", partial_rotary=True),
    "gemma": _GEMMA,
    "gemma2": _GEMMA2,
    "gemma3_text": replace(_GEMMA2, qk_norm="head", rope_per_layer_type=True),
    "olmo2": Family(qk_norm="all", norms=POST_NORMS, norm_weight_fp32=True),
    "granite": Family(multipliers=True),
    "smollm3": Family(window="layer_types", no_rope_layers=True),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

# The MLP activations of act(gate) * up, as transformers' ACT2FN names them (each is torch's own function).
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")

# Rotary embeddings whose cos/sin at a position depend on the position only: the forward pass computes them once
# for every position with transformers' own rotary module. "longrope" (Phi-3.5/Phi-4-mini's 128k contexts) switches
# between two such tables: the long one for a token once its sequence, as transformers counts it (the whole prompt
# in a prompt token's forward pass, the tokens so far in a decode step), is longer than the pretraining length.
# ("dynamic" rescales continuously with the running length, so it is refused.)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
