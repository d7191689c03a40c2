"""Which base projections are served quantized, and their codes: from a GGUF file as stored, or made at load.

``--quantization``:

* ``auto``: a GGUF model's Q8_0 / Q4_0 / Q4_1 projections (and lm_head) are served as stored; other
  tensor types, and models that are not GGUF files, are served dequantized;
* ``none``: everything dequantized to ``--dtype`` (the fp32 values transformers reads);
* ``int8`` / ``int4``: every projection quantized at load (:func:`server.model.quantized.quantize`),
  the lm_head in int8 under both.

``--activations``: ``exact`` (default) multiplies the dequantized weights by the fp32 activations,
so a quantized model's outputs are those of its dequantized copy; ``int8`` lets decode-sized steps
quantize the activations to 8 bits per 32-value block and take integer dot products, as llama.cpp
does (faster; outputs close to, not equal to, the exact ones).

GGUF tensors are matched to the model's modules by name, with llama.cpp's row order of q/k undone
the way transformers undoes it, and each one is checked: its dequantized values must equal the fp32
weight transformers loaded from the same file, bit for bit, or it is served dequantized instead.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import PretrainedConfig

from server.config import activations_problem
from server.model import cpu_gemv
from server.model.architecture import ModelShape
from server.model.gguf_blocks import read_quantized
from server.model.quantized import QuantizedMatrix, from_blocks, load_matrices, quantize, save_matrices
from server.model.weights_source import TensorSource, lm_head_name

log = logging.getLogger(__name__)

# GGUF tensor name (per layer) -> projection, as llama.cpp names them: split projections, or Phi-3's fused ones
# (q/k/v in attn_qkv, gate and up in ffn_up).
_GGUF_NAMES = {
    "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
    "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj",
}
_GGUF_FUSED_NAMES = {"attn_qkv": "qkv_proj", "attn_output": "o_proj", "ffn_up": "gate_up_proj", "ffn_down": "down_proj"}


class UnsupportedQuantization(ValueError):
    pass


def check_supported(quantization: str, device: torch.device, dtype: torch.dtype, activations: str = "exact") -> None:
    """Refuse a quantization this device, dtype or build cannot serve, naming what can."""
    if (problem := activations_problem(activations, quantization)) is not None:
        raise UnsupportedQuantization(problem)
    if quantization in ("auto", "none"):
        return
    if device.type != "cpu":
        raise UnsupportedQuantization(
            f"--quantization {quantization} runs on the CPU only; on {device.type} use --quantization none"
        )
    if dtype != torch.float32:
        raise UnsupportedQuantization(
            f"--quantization {quantization} keeps activations in float32: use it with --dtype float32 (or auto), "
            f"not {str(dtype).removeprefix('torch.')}"
        )
    if not cpu_gemv.available():
        raise UnsupportedQuantization(
            f"--quantization {quantization} needs our C kernel, which did not build here (is gcc installed?); "
            "use --quantization none"
        )


def quantized_weights(
    config: PretrainedConfig,
    tensors: TensorSource,
    gguf: Path | None,
    quantization: str,
    device: torch.device,
    dtype: torch.dtype,
    cache: Path | None = None,
    activations: str = "exact",
) -> dict[str, QuantizedMatrix]:
    """Quantized matrices by module name (``model.layers.0.self_attn.q_proj``, ``lm_head``); the rest stay dense.
    ``cache``: where a GGUF's checked codes are kept between starts. The caller has run :func:`check_supported`
    (the builder does, before the model loads)."""
    out = _matrices(config, tensors, gguf, quantization, device, dtype, cache)
    if activations == "int8":
        if not out:
            log.warning("--activations int8 has no effect: no base weights are served quantized")
        out = {name: dataclasses.replace(m, int8_activations=True) for name, m in out.items()}
    return out


def _matrices(
    config: PretrainedConfig,
    tensors: TensorSource,
    gguf: Path | None,
    quantization: str,
    device: torch.device,
    dtype: torch.dtype,
    cache: Path | None,
) -> dict[str, QuantizedMatrix]:
    shape = ModelShape.from_config(config)
    cpu, f32 = torch.device("cpu"), torch.float32

    def dense(module: str) -> torch.Tensor:  # fp32 on the CPU, read when needed
        return tensors.get(lm_head_name(config) if module == "lm_head" else module + ".weight", cpu, f32)

    if quantization in ("int8", "int4"):
        projections = [shape.module_name(i, p) for i in range(shape.n_layers) for p in shape.projections]
        out = {name: quantize(dense(name), quantization) for name in projections}
        out["lm_head"] = quantize(dense("lm_head"), "int8")
        return out
    if quantization == "none" or gguf is None or device.type != "cpu" or dtype != torch.float32:
        return {}
    if not cpu_gemv.available():
        log.warning("serving %s dequantized: our C kernel did not build here (is gcc installed?)", gguf.name)
        return {}
    return _from_gguf(config, dense, gguf, cache, shape)


def _from_gguf(
    config: PretrainedConfig,
    dense_of: Callable[[str], torch.Tensor],
    gguf: Path,
    cache: Path | None,
    shape: ModelShape,
) -> dict[str, QuantizedMatrix]:
    """The GGUF's quantized projections, checked against the dequantized weights; kept in ``cache`` (a
    safetensors file beside the model's dequantized cache) so later starts skip GGUF's slow header parse."""
    if cache is not None and cache.exists():
        try:
            return _log_served(gguf, load_matrices(cache), None)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring the quantized-weights cache %s: %s", cache, exc)
    arch, stored = read_quantized(gguf)
    wanted: dict[str, str] = {}  # GGUF name -> module name
    for i in range(shape.n_layers):
        for short, proj in (_GGUF_FUSED_NAMES if shape.fused else _GGUF_NAMES).items():
            wanted[f"blk.{i}.{short}.weight"] = shape.module_name(i, proj)
    wanted["output.weight" if "output.weight" in stored else "token_embd.weight"] = "lm_head"
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    # transformers' per-architecture GGUF tensor processor: it undoes llama.cpp's q/k row order.
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    out: dict[str, QuantizedMatrix] = {}
    mismatched: list[str] = []
    for gguf_name, module in wanted.items():
        blocks = stored.get(gguf_name)
        if blocks is None:
            continue
        dense = dense_of(module)
        if gguf_name.startswith("blk."):
            rows = processor.process(np.arange(blocks.codes.shape[0]).reshape(-1, 1), gguf_name).weights
            blocks = blocks.take_rows(torch.from_numpy(np.ascontiguousarray(rows).reshape(-1)))
        matrix = from_blocks(blocks)
        if tuple(dense.shape) != matrix.shape or not torch.equal(matrix.dequantize(), dense):
            mismatched.append(gguf_name)
            continue
        out[module] = matrix
    if mismatched:
        log.warning("%d GGUF tensors did not match the dequantized weights and are served dequantized: %s",
                    len(mismatched), ", ".join(mismatched[:5]))
    if cache is not None:
        try:
            save_matrices(out, cache)
        except OSError as exc:  # a read-only cache: the next start reads the GGUF again
            log.warning("could not keep the quantized weights in %s: %s", cache, exc)
    return _log_served(gguf, out, len(wanted))


def _log_served(gguf: Path, out: dict[str, QuantizedMatrix], of: int | None) -> dict[str, QuantizedMatrix]:
    kinds = ", ".join(sorted({m.kind for m in out.values()})) or "none"
    total = f" of {of}" if of is not None else ""
    log.info("serving %d%s matrices of %s quantized as stored (%s): %d MB of codes and scales",
             len(out), total, gguf.name, kinds, sum(m.nbytes for m in out.values()) >> 20)
    return out
