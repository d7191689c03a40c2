"""A tiny model saved to disk, so a real ``loraplex serve`` process can load it with ``--model``."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tests.helpers.tiny import AdapterSpec, make_adapter, make_model, make_tokenizer

# A plain chat template in the usual role-tag style; the tiny tokenizer has none of its own.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def save_tiny_model(
    folder: Path, seed: int = 5, layers: int = 2, arch: str = "llama", **extras
) -> tuple[Path, PreTrainedModel, PreTrainedTokenizerBase]:
    """Save a tiny model of ``arch`` (tests.helpers.tiny.ARCHITECTURES; ``extras``: config fields) and its
    tokenizer (with a chat template) under ``folder``; return (dir, model, tokenizer)."""
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    model = make_model(arch, len(tok), seed=seed, layers=layers, **extras)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


def save_tiny_model_with_adapters(
    root: Path, seeds: dict[str, int]
) -> tuple[Path, PreTrainedModel, PreTrainedTokenizerBase, dict[str, Path]]:
    """:func:`save_tiny_model` under ``root / "tiny"``, plus one rank-8 q/v PEFT adapter per name (its seed)."""
    model_dir, base, tok = save_tiny_model(root / "tiny")
    spec = AdapterSpec("a", 8, 16, ("q_proj", "v_proj"))
    adapters = {name: make_adapter(base, spec, root / f"src-{name}", seed) for name, seed in seeds.items()}
    return model_dir, base, tok, adapters
