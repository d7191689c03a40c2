"""The model family an adapter says it was trained on, from its ``base_model_name_or_path``, checked against the
served base: two families can have LoRA targets of the same names and shapes (Mistral 7B and Llama 3 8B do), so
names and shapes alone would take the adapter of one for the other.

The family is read exactly from a local base folder's ``config.json`` when the path exists here; otherwise from
the name, when it names exactly one family (``meta-llama/Llama-3.1-8B``, ``Qwen/Qwen2.5-7B``,
``google/gemma-2-2b``). A name that names none, or several (a merge), is not judged."""

from __future__ import annotations

import json
import re
from pathlib import Path

from adapters_store.errors import InvalidAdapter

# Name patterns (lowercase; the most specific first for each family) -> transformers model_type.
_NAME_PATTERNS = (
    (r"qwen-?3", "qwen3"),
    (r"qwen-?2|qwq", "qwen2"),
    (r"gemma-?3", "gemma3_text"),
    (r"gemma-?2", "gemma2"),
    (r"gemma", "gemma"),
    (r"phi-?3|phi-?4", "phi3"),
    (r"mistral|ministral|mixtral|codestral|mathstral", "mistral"),
    (r"smollm-?3", "smollm3"),
    (r"llama|smollm-?2|smollm-", "llama"),
    (r"olmo-?2", "olmo2"),
    (r"granite", "granite"),
)
# Served model types an adapter's family may also be: a Gemma 3 adapter's name is the same for the text model.
_SAME = {"gemma3": "gemma3_text"}


def named_family(base: str) -> str | None:
    """The model type ``base`` (a hub name or a local path) names, or None when it names none or several."""
    config = Path(base).expanduser() / "config.json"
    try:
        if config.is_file():
            model_type = json.loads(config.read_text()).get("model_type")
            return _SAME.get(model_type, model_type) if isinstance(model_type, str) else None
    except (OSError, ValueError):
        pass
    name = base.lower()
    found: set[str] = set()
    for pattern, model_type in _NAME_PATTERNS:
        if re.search(pattern, name):
            found.add(model_type)
            name = re.sub(pattern, " ", name)  # "gemma-2" is not also "gemma"
    return found.pop() if len(found) == 1 else None


def check_family(adapter_config: dict, served: str) -> None:
    """Refuse an adapter whose base names another family than the served model's (``served``: its model_type)."""
    base = adapter_config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        return
    family = named_family(base)
    if family is not None and family != served:
        raise InvalidAdapter(
            f"the adapter was trained on {base!r} ({family}), but this server's base model is a {served}: "
            f"its LoRA weights would add into a different model (if the name is wrong, correct "
            f"base_model_name_or_path in adapter_config.json)"
        )
