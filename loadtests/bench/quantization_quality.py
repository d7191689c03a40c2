"""What quantized (and bf16) base weights cost in quality, against the fp32 model, with and without an adapter.

    python -m loadtests.bench.quantization_quality [--new-tokens 32]

For each of a fixed set of prompts the fp32 engine (``--quantization none``) writes a greedy
continuation; every variant then reads prompt + continuation in one step (teacher forcing) and
we compare, at each continuation position, its next-token distribution with fp32's:

* top-1 agreement: the share of positions where its argmax is fp32's greedy token;
* mean log-prob difference: mean over positions of ``log p_fp32(tok) - log p_variant(tok)``
  for fp32's token (positive = the variant finds fp32's choice less likely), and its mean |.|;
* greedy match: the share of prompts whose own greedy continuation equals fp32's exactly.

Variants: the GGUF's own Q4_1/Q8_0 codes (``auto``; the fp32 model *is* their dequantization, so
this row checks that serving the codes changes nothing), ``int8`` (per channel) and ``int4``
(32-value groups) made from those fp32 weights, and ``--dtype bfloat16``. The adapter rows use one
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
from server.lora.metadata import LoraBatch
from server.lora.weights import load_weights
from server.model.attention import AttentionBatch
from server.model.llama import StepInputs
from server.model.loading import LoadedModel, load_model
from server.model.runner import ModelRunner
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
VARIANTS = {  # name -> (dtype, quantization)
    "fp32": ("float32", "none"),
    "gguf_q4_1": ("float32", "auto"),
    "int8": ("float32", "int8"),
    "int4": ("float32", "int4"),
    "bf16": ("bfloat16", "none"),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def runner_for(loaded: LoadedModel, store: Path, dtype: str, quantization: str) -> tuple[ModelRunner, Serving]:
    config = Config(
        model=ModelConfig(dtype=dtype, quantization=quantization, cache_dir=CACHE_DIR),
        lora=LoraConfig(adapters_dir=store, max_lora_rank=16, max_loras=2),
        cache=CacheConfig(kv_cache_tokens=4096),
    )
    serving = build_serving(config, loaded)
    return serving.engine.runner, serving


@torch.inference_mode()
def all_logits(runner: ModelRunner, ids: list[int], slot: int) -> torch.Tensor:
    """fp32 logits ``[len(ids), vocab]`` of one sequence read in one step (every row sampled)."""
    n = len(ids)
    blocks = list(range(-(-n // runner.block_size)))
    dev = runner.device
    step = StepInputs(
        input_ids=torch.tensor(ids, device=dev),
        positions=torch.arange(n, device=dev),
        attention=AttentionBatch.build([(blocks, 0, n)], runner.block_size, dev, runner.decode_kernel),
        lora=LoraBatch.build([slot] * n, dev, runner.backend),
        lora_projections=frozenset(PROJECTIONS) if slot >= 0 else frozenset(),
        sample_rows=torch.arange(n, device=dev),
    )
    return runner.model.forward(step, runner.kv_cache)


def greedy(runner: ModelRunner, prompt: list[int], new: int, slot: int) -> list[int]:
    ids = list(prompt)
    for _ in range(new):  # re-reads the whole sequence each token: simple, and the same for every variant
        ids.append(int(all_logits(runner, ids, slot)[-1].argmax()))
    return ids[len(prompt):]


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
    for name, (dtype, quantization) in VARIANTS.items():
        runner, serving = runner_for(loaded, store, dtype, quantization)
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
                    cont = greedy(runner, prompt, args.new_tokens, s)
                    logp = torch.log_softmax(all_logits(runner, prompt + cont, s)[len(prompt) - 1 : -1], -1)
                    reference[i, adapter] = (cont, logp)
                cont, ref_logp = reference[i, adapter]
                logp = torch.log_softmax(all_logits(runner, prompt + cont, s)[len(prompt) - 1 : -1], -1)
                tok = torch.tensor(cont)
                agree += int((logp.argmax(-1) == tok).sum())
                total += len(cont)
                diffs += (ref_logp.gather(1, tok[:, None]) - logp.gather(1, tok[:, None]))[:, 0].tolist()
                same += int(name == "fp32" or greedy(runner, prompt, args.new_tokens, s) == cont)
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
