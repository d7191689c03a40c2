"""Run as a child process: build the serving copy of a model folder's weights and print, as JSON, the peak
resident memory over the process's baseline (after imports) and the bytes the serving copy holds.

    python -m tests.helpers.load_rss FOLDER DTYPE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoConfig


def peak_mb() -> float:
    """This process image's peak resident set (VmHWM: getrusage's ru_maxrss would carry the forking parent's
    peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    from server.model import cpu_gemv, cpu_layer_ops
    from server.model.decoder import CausalLM, rope_tables, rotary_module
    from server.model.weights_source import FolderTensors

    folder, dtype = Path(sys.argv[1]), getattr(torch, sys.argv[2])
    config = AutoConfig.from_pretrained(folder)
    # Before the baseline: the modules and native libraries a build loads, and the rope tables it makes.
    cpu_gemv.available(), cpu_layer_ops.available()
    rope_tables(rotary_module(config), config.max_position_embeddings)
    baseline = peak_mb()
    model = CausalLM(config, FolderTensors(folder), torch.device("cpu"), dtype)
    held = sum(t.nbytes for t in (model.embed, model.norm, *(t for pair in model.rope_tables.values() for t in pair)))
    held += 0 if model.lm_head is model.embed else model.lm_head.nbytes
    for layer in model.layers:
        held += sum(t.nbytes for t in (layer.w_qkv, layer.w_o, layer.w_gate_up, layer.w_down, *layer.norms.values()))
    sys.stdout.write(json.dumps({"peak_over_baseline_mb": peak_mb() - baseline, "held_mb": held / 2**20}) + "\n")


if __name__ == "__main__":
    main()
