"""Converting a GGUF file into the safetensors cache: ours (tensor by tensor, server.model.gguf_convert) against
transformers' ``from_pretrained(gguf_file=...)`` + ``save_pretrained``, each in a fresh child process: seconds,
and the peak resident set (VmHWM) over the process's baseline once the modules a conversion imports are loaded.

    python -m loadtests.bench.gguf_conversion [--gguf FILE]   (default: the embedded model's GGUF)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtests.machine import machine

METHODS = ("loraplex", "transformers")


def child(method: str, gguf: Path, out: Path) -> None:
    """One conversion in this process; prints its JSON result."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.model.gguf_convert import convert
    from tests.helpers.convert_rss import import_conversion_modules
    from tests.helpers.load_rss import peak_mb

    import_conversion_modules(gguf)  # both methods import the same modules: the baseline is after them
    baseline, started = peak_mb(), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if method == "loraplex":
        convert(gguf, out)
    else:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    seconds = time.perf_counter() - started
    sys.stdout.write(json.dumps({"seconds": seconds, "peak_over_baseline_mb": peak_mb() - baseline}) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("loadtests/results/gguf_conversion.json"))
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return
    if args.gguf is None:
        from server.model.default_model import default_gguf_path

        args.gguf = default_gguf_path()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            run = subprocess.run([sys.executable, "-m", "loadtests.bench.gguf_conversion", "--child", method,
                                  str(args.gguf), str(Path(tmp) / method)], capture_output=True, text=True, check=True)
            results[method] = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"{method}: {results[method]['seconds']:.1f} s, peak {results[method]['peak_over_baseline_mb']:.0f} "
                  "MB over the baseline", flush=True)
    ours, theirs = results["loraplex"], results["transformers"]
    result = {"command": "python -m loadtests.bench.gguf_conversion", "machine": machine(), "gguf": args.gguf.name,
              "gguf_mb": args.gguf.stat().st_size / 2**20, "results": results,
              "peak_ratio": ours["peak_over_baseline_mb"] / theirs["peak_over_baseline_mb"],
              "time_ratio": ours["seconds"] / theirs["seconds"]}
    print(f"ours / transformers: peak {result['peak_ratio']:.2f}x, time {result['time_ratio']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
