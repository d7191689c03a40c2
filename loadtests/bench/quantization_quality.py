"""What quantized (and bf16) base weights cost in quality, against the fp32 model, with and without an adapter.

    python -m loadtests.bench.quantization_quality [--new-tokens 32]

For each of a fixed set of prompts the fp32 engine (``--quantization none``) writes a greedy
continuation; every variant then decodes prompt + continuation as the server would, the prompt in
one step and then fp32's tokens fed one per step (teacher forcing), and we compare, at each
continuation position, its next-token distribution with fp32's:

* top-1 agreement: the share of positions where its argmax is fp32's greedy token;
* mean log-prob difference: mean over positions of ``log p_fp32(tok) - log p_variant(tok)``
  for fp32's token (positive = the variant finds fp32's choice less likely), and its mean |.|;
* greedy match: the share of prompts whose own greedy continuation equals fp32's exactly.

Variants: the GGUF's own Q4_1/Q8_0 codes (``auto``; the fp32 model *is* their dequantization, so
this row checks that serving the codes changes nothing), ``int8`` (per channel) and ``int4``
(32-value groups) made from those fp32 weights, and ``--dtype bfloat16``; ``_a8`` rows add
``--activations int8`` (8-bit activations in decode steps, as llama.cpp computes). The adapter rows use one
rank-16 adapter on all seven projections (weights ~ N(0, 0.05)), full precision in every variant.
Writes ``loadtests/results/quantization_quality.json``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from adapters_store.validation import inspect
from loadtests.bench.common import CACHE_DIR, setup_torch, write_json
from server.config import CacheConfig, Config, LoraConfig, ModelConfig
from server.engine.builder import Serving, build_serving
from server.engine.scheduler import SchedulerConfig
from server.lora.weights import load_weights
from server.model.loading import LoadedModel, load_model
from server.model.runner import ModelRunner, SeqStep, one_adapter
from tests.helpers.tiny import AdapterSpec, make_adapter

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "To make a cup of tea, first",
    "The largest planet in the solar system is",
    "In 1969, astronauts landed",
    "Photosynthesis is the process by which",
    "import numpy as np\n",
    "The opposite of hot is",
    "A haiku about the sea:",
]
VARIANTS = {  # name -> (dtype, quantization, activations)
    "fp32": ("float32", "none", "exact"),
    "gguf_q4_1": ("float32", "auto", "exact"),
    "gguf_q4_1_a8": ("float32", "auto", "int8"),
    "int8": ("float32", "int8", "exact"),
    "int8_a8": ("float32", "int8", "int8"),
    "int4": ("float32", "int4", "exact"),
    "bf16": ("bfloat16", "none", "exact"),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def runner_for(
    loaded: LoadedModel, store: Path, dtype: str, quantization: str, activations: str
) -> tuple[ModelRunner, Serving]:
    config = Config(
        model=ModelConfig(dtype=dtype, quantization=quantization, activations=activations, cache_dir=CACHE_DIR),
        lora=LoraConfig(adapters_dir=store, max_lora_rank=16, max_loras=2),
        cache=CacheConfig(kv_cache_tokens=4096),
        scheduler=SchedulerConfig(max_model_len=4096),
    )
    serving = build_serving(config, loaded)
    return serving.engine.runner, serving


@torch.inference_mode()
def decode(runner: ModelRunner, prompt: list[int], new: int, slot: int, forced: list[int] | None = None) -> tuple[
    list[int], torch.Tensor
]:
    """Decode as the server does: the prompt in one step, then one token a step on the KV cache. Feeds back its own
    greedy token, or the ``forced`` continuation's (teacher forcing). Returns the tokens chosen at each position and
    the fp32 logits ``[new, vocab]`` that chose them."""
    blocks = list(range(-(-(len(prompt) + new) // runner.block_size)))
    logits = [runner.execute([SeqStep(prompt, 0, blocks, one_adapter(slot), True)])[-1]]
    while len(logits) < new:
        fed = int(logits[-1].argmax()) if forced is None else forced[len(logits) - 1]
        step = SeqStep([fed], len(prompt) + len(logits) - 1, blocks, one_adapter(slot), True)
        logits.append(runner.execute([step])[-1])
    out = torch.stack(logits)
    return out.argmax(-1).tolist(), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("loadtests/results/quantization_quality.json"))
    args = p.parse_args()
    setup_torch()
    loaded = load_model(None, CACHE_DIR)
    store = Path(tempfile.mkdtemp(prefix="quality-store-"))
    make_adapter(loaded.hf_model, AdapterSpec("all7", 16, 32, PROJECTIONS), store, seed=7, std=0.05)
    prompts = [loaded.tokenizer(t)["input_ids"] for t in PROMPTS]
    rows: dict[str, dict] = {}
    reference: dict[tuple[int, int], tuple[list[int], torch.Tensor]] = {}
    for name, (dtype, quantization, activations) in VARIANTS.items():
        runner, serving = runner_for(loaded, store, dtype, quantization, activations)
        slot = 0
        folder = store / "all7"
        manifest, binding = inspect(folder, serving.spec, 16)
        runner.slots.write(slot, load_weights(folder, manifest, binding))  # what activating an adapter does
        for adapter in (False, True):
            s = slot if adapter else -1
            agree = total = same = 0
            diffs: list[float] = []
            for i, prompt in enumerate(prompts):
                if name == "fp32":
                    cont, logits = decode(runner, prompt, args.new_tokens, s)
                    reference[i, adapter] = (cont, torch.log_softmax(logits, -1))
                cont, ref_logp = reference[i, adapter]
                own, _ = decode(runner, prompt, args.new_tokens, s)
                _, forced = decode(runner, prompt, args.new_tokens, s, forced=cont)
                logp = torch.log_softmax(forced, -1)
                tok = torch.tensor(cont)
                agree += int((logp.argmax(-1) == tok).sum())
                total += len(cont)
                diffs += (ref_logp.gather(1, tok[:, None]) - logp.gather(1, tok[:, None]))[:, 0].tolist()
                same += int(own == cont)
            key = f"{name}{' + adapter' if adapter else ''}"
            rows[key] = {
                "weights": runner.model.weights_summary(),
                "top1_agreement": agree / total,
                "mean_logprob_diff": sum(diffs) / len(diffs),
                "mean_abs_logprob_diff": sum(abs(d) for d in diffs) / len(diffs),
                "greedy_match": same / len(prompts),
            }
            r = rows[key]
            print(f"{key:20s} top-1 {r['top1_agreement']:.4f}  mean dlogp {r['mean_logprob_diff']:+.5f}  "
                  f"|dlogp| {r['mean_abs_logprob_diff']:.5f}  greedy match {r['greedy_match']:.2f}  "
                  f"[{r['weights']}]", flush=True)
        serving.stop()
        del runner, serving
    write_json(args.out, {"prompts": PROMPTS, "new_tokens": args.new_tokens, "adapter": "rank 16, all 7, std 0.05",
                          "variants": rows})


if __name__ == "__main__":
    main()
