"""bf16 serving of each family's arithmetic (Gemma's and OLMo 2's fp32-weight norms, soft-caps, windows, Granite's
multipliers, SmolLM3's RoPE-less layers): a prompt past the window and six decode steps, each step's logits as
close to the fp32 transformers model as transformers' own bf16 copy is (bf16 rounding, not a different model)."""

from __future__ import annotations

import copy

import pytest
import torch

from server.lora.metadata import LoraBackend
from server.model.decoder import CausalLM
from server.model.runner import ModelRunner, SeqStep
from server.model.weights_source import ModuleTensors
from tests.helpers.tiny import CORPUS, make_model, make_tokenizer


@pytest.mark.parametrize("arch", ["qwen3", "gemma", "gemma2", "gemma3", "olmo2", "granite", "smollm3"])
def test_bf16_steps_stay_within_bf16_rounding_of_transformers(arch):
    tok = make_tokenizer()
    base = make_model(arch, len(tok), seed=1)
    hf_bf16 = copy.deepcopy(base).to(torch.bfloat16)
    model = CausalLM(base.config, ModuleTensors(base), torch.device("cpu"), torch.bfloat16)
    runner = ModelRunner(model, 16, 16, 1, 8, LoraBackend.CPU_KERNEL, decode_kernel=True)
    seq = tok(CORPUS[1])["input_ids"]  # 31 tokens: past the window (8) of the windowed families
    logits = runner.execute([SeqStep(seq, 0, [0, 1, 2], (), True)])[0]
    ours, theirs = [], []
    for _ in range(6):
        with torch.inference_mode():
            fp32 = base(torch.tensor([seq])).logits[0, -1]
            bf16 = hf_bf16(torch.tensor([seq])).logits[0, -1].float()
        ours.append(float((logits - fp32).abs().max()))
        theirs.append(float((bf16 - fp32).abs().max()))
        assert int(logits.argmax()) == int(bf16.argmax()), (arch, len(seq))
        seq.append(int(bf16.argmax()))
        logits = runner.execute([SeqStep([seq[-1]], len(seq) - 1, [0, 1, 2], (), True)])[0]
    assert max(ours) <= 2 * max(theirs) + 0.02, (arch, ours, theirs)
