"""The reference no one here wrote: transformers + PEFT, one request at a time."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel


def peft_model(base: PreTrainedModel, adapter: Path | None) -> PreTrainedModel:
    if adapter is None:
        return base
    return PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()


@torch.inference_mode()
def greedy(model: PreTrainedModel, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    """transformers' greedy ``generate`` for one prompt; the new tokens (EOS included if produced)."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id if eos_token_id is not None else 0,
    )
    return out[0, len(prompt_ids) :].tolist()


@torch.inference_mode()
def last_logits(model: PreTrainedModel, prompt_ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([prompt_ids])).logits[0, -1].float()


def peft_deltas(base: PreTrainedModel, folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Per module the adapter targets: PEFT's own ``scaling * B @ A`` (fp32) and its scaling."""
    model = peft_model(base, folder)
    deltas, scalings = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            name = name.removeprefix("base_model.model.")
            deltas[name] = module.get_delta_weight("default").detach().float().clone()
            scalings[name] = module.scaling["default"]
    assert deltas, f"PEFT bound no module of {folder}"
    return deltas, scalings


def merged_model(base: PreTrainedModel, terms: list[tuple[Path, float]]) -> PreTrainedModel:
    """A copy of ``base`` with ``weight * delta`` of each adapter merged into its weights (PEFT's deltas)."""
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for folder, weight in terms:
            for module, delta in peft_deltas(base, folder)[0].items():
                target = merged.get_submodule(module).weight
                target += (weight * delta).to(target.dtype)
    return merged.eval()
