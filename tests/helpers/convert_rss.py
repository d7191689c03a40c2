"""Run as a child process: convert a GGUF file into a safetensors folder (server.model.gguf_convert) and print,
as JSON, the peak resident memory over the process's baseline (after imports) and the largest tensor in fp32.

    python -m tests.helpers.convert_rss GGUF OUT SHARD_MB
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.helpers.load_rss import peak_mb


def import_conversion_modules(gguf: Path) -> None:
    """Load the modules a conversion imports (transformers' GGUF reader, tokenizer converter and model classes:
    ~110 MB, the same for any model) by reading ``gguf``'s config and tokenizer once, so a peak measured after
    this is the conversion's data."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(config)


def main() -> None:
    from gguf import GGUFReader

    from server.model import gguf_convert

    gguf, out, shard_mb = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    largest = max(int(t.n_elements) for t in GGUFReader(gguf).tensors) * 4 / 2**20
    gguf_convert.SHARD_BYTES = shard_mb << 20
    import_conversion_modules(gguf)
    baseline = peak_mb()
    out.mkdir(parents=True, exist_ok=True)
    gguf_convert.convert(gguf, out)
    sys.stdout.write(json.dumps({"peak_over_baseline_mb": peak_mb() - baseline, "largest_tensor_mb": largest}) + "\n")


if __name__ == "__main__":
    main()
