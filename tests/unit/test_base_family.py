"""The family an adapter names in base_model_name_or_path, and the refusal of one trained on another family."""

from __future__ import annotations

import json

import pytest

from adapters_store.base_family import check_family, named_family
from adapters_store.errors import InvalidAdapter


@pytest.mark.parametrize(
    ("base", "family"),
    [
        ("meta-llama/Llama-3.1-8B-Instruct", "llama"),
        ("unsloth/llama-3-8b-bnb-4bit", "llama"),
        ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "llama"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "llama"),
        ("HuggingFaceTB/SmolLM3-3B", "smollm3"),
        ("mistralai/Mistral-7B-Instruct-v0.3", "mistral"),
        ("Qwen/Qwen2.5-7B-Instruct", "qwen2"),
        ("Qwen/Qwen3-8B", "qwen3"),
        ("google/gemma-7b", "gemma"),
        ("google/gemma-2-2b-it", "gemma2"),
        ("google/gemma-3-1b-it", "gemma3_text"),
        ("microsoft/Phi-3-mini-4k-instruct", "phi3"),
        ("microsoft/phi-4", "phi3"),
        ("allenai/OLMo-2-1124-7B", "olmo2"),
        ("ibm-granite/granite-3.1-8b-instruct", "granite"),
        ("someone/llama-mistral-merge", None),  # names two families: not judged
        ("my-finetune", None),
        ("/a/path/that/does/not/exist/model", None),
    ],
)
def test_named_family(base, family):
    assert named_family(base) == family


def test_a_local_base_folder_is_read_exactly(tmp_path):
    folder = tmp_path / "llama-looking-name"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    assert named_family(str(folder)) == "qwen3"


def test_another_family_is_refused_naming_both():
    check_family({"base_model_name_or_path": "Qwen/Qwen3-0.6B"}, "qwen3")
    check_family({"base_model_name_or_path": None}, "llama")
    check_family({}, "llama")
    with pytest.raises(InvalidAdapter, match=r"trained on 'Qwen/Qwen3-0.6B' \(qwen3\), but this server's base model "
                                             r"is a llama"):
        check_family({"base_model_name_or_path": "Qwen/Qwen3-0.6B"}, "llama")
