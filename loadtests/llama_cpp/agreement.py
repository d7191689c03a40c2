"""Does llama-server generate what transformers and PEFT generate? Greedy tokens of a few prompts, compared.

The reference is the default model in fp32 (``transformers`` ``generate``, greedy), and the same with one adapter
through PEFT. llama-server gets the reference's prompt token ids on ``/completion`` (so the tokenizers cannot
differ there) with temperature 0, and answers with its token ids (``return_tokens``). Each prompt's record says
how many leading tokens agree. The load runs send text, so the prompts' tokenization is compared on its own
(``/tokenize`` with the special tokens a text prompt gets against the reference tokenizer's ``input_ids``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from loadtests.llama_cpp.server import lora_field

PROMPTS = (
    "The capital of France is",
    "Here is a short story about a lighthouse keeper:",
    "def fibonacci(n):",
)
NEW_TOKENS = 32


def reference(adapter: Path, prompts: Sequence[str] = PROMPTS, new_tokens: int = NEW_TOKENS) -> dict:
    """Greedy tokens from transformers (``base``) and transformers + PEFT with ``adapter`` (``adapter``).

    Heavy (loads the model): run it in a fresh process (``loadtests.bench.common.in_fresh_process``).
    Generation stops at ``new_tokens`` or after an end-of-sequence token, which is kept (llama-server's
    ``tokens`` keep it too).
    """
    import torch
    from peft import PeftModel

    from loadtests.bench.common import load_default, setup_torch

    setup_torch()
    loaded = load_default()
    tok = loaded.tokenizer
    model = PeftModel.from_pretrained(loaded.hf_model, str(adapter)).eval()
    out: dict = {"prompt_ids": [tok(p)["input_ids"] for p in prompts], "base": [], "adapter": []}

    def greedy(ids: list[int]) -> list[int]:
        x = torch.tensor([ids])
        with torch.inference_mode():
            y = model.generate(x, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
        return y[0, len(ids) :].tolist()

    for ids in out["prompt_ids"]:
        with model.disable_adapter():
            out["base"].append(greedy(ids))
        out["adapter"].append(greedy(ids))
    return out


def leading_agreement(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def llama_generate(url: str, prompt_ids: list[int], lora: list[dict], new_tokens: int) -> list[int]:
    """Greedy token ids from llama-server's ``/completion`` for ``prompt_ids`` with the ``lora`` field given."""
    body = {
        "prompt": prompt_ids,
        "n_predict": new_tokens,
        "temperature": 0,
        "top_k": 1,
        "cache_prompt": False,
        "return_tokens": True,
        "lora": lora,
    }
    resp = httpx.post(url + "/completion", json=body, timeout=300, trust_env=False)
    resp.raise_for_status()
    return list(resp.json()["tokens"])


def llama_tokenize(url: str, text: str) -> list[int]:
    """The ids llama-server feeds the model for a text prompt (BOS included when the model asks for one)."""
    resp = httpx.post(url + "/tokenize", json={"content": text, "add_special": True}, timeout=60, trust_env=False)
    resp.raise_for_status()
    return list(resp.json()["tokens"])


def compare(
    url: str,
    ref: dict,
    lora_ids: Mapping[str, int],
    adapter: str,
    prompts: Sequence[str] = PROMPTS,
    new_tokens: int = NEW_TOKENS,
) -> dict:
    """llama-server at ``url`` against ``reference``'s output made with ``adapter``: per prompt and kind, the
    tokens and their agreement. ``lora_ids``: the adapters the server loaded (name -> id)."""
    rows = []
    for prompt, ids, base, adapted in zip(prompts, ref["prompt_ids"], ref["base"], ref["adapter"], strict=True):
        theirs_ids = llama_tokenize(url, prompt)
        for kind, want, name in (("base", base, None), ("adapter", adapted, adapter)):
            got = llama_generate(url, ids, lora_field(lora_ids, name), new_tokens)
            rows.append(
                {
                    "prompt": prompt,
                    "kind": kind,
                    "same_prompt_tokens": theirs_ids == ids,
                    "reference": want,
                    "llama_cpp": got,
                    "leading_agreement": leading_agreement(want, got),
                    "equal": want == got,
                }
            )
    return {
        "new_tokens": new_tokens,
        "all_equal": all(r["equal"] for r in rows),
        "same_prompt_tokens": all(r["same_prompt_tokens"] for r in rows),
        # the check can tell an applied adapter from an ignored one only where the adapter changes the reference
        "adapter_changes_reference": sum(b != a for b, a in zip(ref["base"], ref["adapter"], strict=True)),
        "prompts": rows,
    }
