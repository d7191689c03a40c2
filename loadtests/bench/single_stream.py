"""Single-stream decode speed: one request, a ~16-token prompt, 128 new tokens greedy (EOS ignored).

Systems, on the default model (SmolLM2-135M, fp32, CPU, 2 threads):

* loraplex engine in-process (no HTTP), base model;
* loraplex engine with one rank-16 adapter on all seven projections;
* transformers ``model.generate`` on the base model (inference mode);
* transformers + PEFT ``generate`` with the same adapter (a reference row).

The engine is also stepped on the calling thread (rows "stepped inline"):
a diagnostic of the cost of stepping on another thread than the one that
loaded the model (see ``common.step_inline``).

Time to first token (prefill + first sample) is measured separately; decode
tokens/s is ``(n - 1) / (t_last - t_first)``, from per-token timestamps (the
engine's output callbacks; a streamer for ``generate``). Each system runs
``--runs`` times after a warm-up; the table shows the median run.

Run: ``python -m loadtests.bench.single_stream [--max-tokens 128] [--runs 3]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers.generation.streamers import BaseStreamer

from loadtests.bench.common import (
    CACHE_DIR,
    TimedSink,
    cpu_check,
    in_fresh_process,
    load_default,
    make_adapters,
    quiet_run,
    setup_torch,
    step_inline,
    write_json,
)
from server.adapters.selection import Selection
from server.engine.request import Request, SamplingParams
from tests.helpers import engine as eng

PROMPT = "The old lighthouse keeper climbed the stairs every evening to light the lamp, and"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--backend", default="auto", help="loraplex LoRA backend (auto: the CPU kernel when it builds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("loadtests/results/single_stream.json"))
    return p.parse_args()


def timing(t0: float, times: list[float], tokens: list[int]) -> dict:
    """``times[i]``: when token ``i`` became available; ``t0``: when the request was made."""
    n = len(tokens)
    ttft = times[0] - t0
    decode = (n - 1) / (times[-1] - times[0]) if n > 1 else float("nan")
    return {"tokens": n, "ttft_s": ttft, "total_s": times[-1] - t0, "decode_tok_s": decode}


class _Stamps(BaseStreamer):
    """Records when ``generate`` hands over each new token (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def hf_once(model, prompt: list[int], max_new: int) -> tuple[dict, list[int]]:
    ids = torch.tensor([prompt])
    stamps = _Stamps()
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=None,  # EOS neither stops nor is suppressed, as ignore_eos in loraplex
        pad_token_id=0,
        streamer=stamps,
    )
    tokens = out[0, len(prompt) :].tolist()
    return timing(t0, stamps.times, tokens), tokens


def engine_once(
    serving, prompt: list[int], adapter: str | None, max_new: int, tag: str, inline: bool
) -> tuple[dict, list[int]]:
    params = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
    stored = serving.store.get(adapter) if adapter else None
    sink = TimedSink()
    t0 = time.perf_counter()
    serving.engine.submit(Request(tag, prompt, params, selection=Selection.of(stored)), sink)
    if inline:
        step_inline(serving.engine)
    if not sink.done.wait(600):
        raise RuntimeError(f"request {tag} did not finish in 600 s")
    if sink.error is not None:
        raise RuntimeError(f"request {tag} failed: {sink.error}")
    # One output per step and one token per output for a single stream; keep the times of token outputs.
    times = [t for t, o in zip(sink.times, sink.outputs, strict=True) for _ in o.token_ids]
    return timing(t0, times, sink.token_ids), sink.token_ids


def repeat(fn, runs: int) -> tuple[list[dict], list[int]]:
    fn()  # warm-up
    rows, tokens = [], None
    for _ in range(runs):
        row, toks = fn()
        if tokens is not None and toks != tokens:
            print("  !! greedy output changed between runs")
        tokens = toks
        rows.append(row)
    assert tokens is not None
    return rows, tokens


def median_row(rows: list[dict]) -> dict:
    ranked = sorted(rows, key=lambda r: r["decode_tok_s"])
    mid = ranked[len(ranked) // 2]
    return {
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in mid.items()},
        "decode_tok_s_all_runs": [round(r["decode_tok_s"], 2) for r in rows],
        "ttft_s_all_runs": [round(r["ttft_s"], 4) for r in rows],
        "decode_tok_s_median": round(statistics.median(r["decode_tok_s"] for r in rows), 2),
    }


def loraplex_rows(adapters_dir: Path, prompt: list[int], name: str, args) -> tuple[dict, dict, str]:
    """The loraplex rows, run in a fresh process as the server runs the engine."""
    setup_torch()
    base = load_default()
    results: dict[str, dict] = {}
    outputs: dict[str, list[int]] = {}
    backend = args.backend
    for inline in (False, True):
        serving = eng.build(
            base.hf_model, base.tokenizer, adapters_dir, CACHE_DIR, backend=args.backend, max_rank=args.rank
        )
        backend = serving.engine.runner.backend.value
        if not inline:
            serving.engine.start()
        try:
            for key, adapter, label in (("loraplex_base", None, "base"), ("loraplex_lora", name, "1 adapter")):
                where = ", stepped inline" if inline else ""
                print(f"running loraplex ({label}{where}) ...", flush=True)
                counter = iter(range(1 << 30))
                (rows, outputs[key + "_inline" * inline]), share = quiet_run(
                    lambda a=adapter, c=counter, i=inline, srv=serving: repeat(
                        lambda: engine_once(srv, prompt, a, args.max_tokens, f"r{next(c)}", i), args.runs
                    ),
                    f"loraplex {label}{where}",
                )
                results[key + "_inline" * inline] = {
                    "system": f"loraplex engine ({backend}), {label}{where}",
                    **median_row(rows),
                    "other_load": share,
                }
        finally:
            if not inline:
                serving.stop()

    return results, outputs, backend


def main() -> None:
    args = parse_args()
    setup_torch()
    started = time.perf_counter()
    checks = [cpu_check("start")]
    base = load_default()
    prompt = base.tokenizer(PROMPT)["input_ids"]
    results: dict[str, dict] = {}
    outputs: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-adapter-") as tmp:
        adapters_dir = Path(tmp)
        (name,) = make_adapters(base, adapters_dir, 1, args.rank, args.seed)
        print(
            f"one request, prompt {len(prompt)} tokens, {args.max_tokens} new tokens greedy (EOS ignored), "
            f"fp32, {torch.get_num_threads()} threads, {args.runs} runs each after a warm-up"
        )

        print("running transformers generate (base) ...", flush=True)
        (rows, outputs["hf_base"]), share = quiet_run(
            lambda: repeat(lambda: hf_once(base.hf_model, prompt, args.max_tokens), args.runs), "transformers"
        )
        results["hf_base"] = {"system": "transformers generate, base", **median_row(rows), "other_load": share}

        # The engine as served, in a fresh process (this one has run torch on its main thread, whose
        # live OpenMP team would throttle the engine thread's), then stepped inline (a diagnostic).
        child = in_fresh_process(loraplex_rows, adapters_dir, prompt, name, args)
        results.update(child[0])
        outputs.update(child[1])
        backend = child[2]

        print("running transformers + PEFT generate (1 adapter) ...", flush=True)
        peft = PeftModel.from_pretrained(load_default().hf_model, adapters_dir / name).eval()
        (rows, outputs["peft_lora"]), share = quiet_run(
            lambda: repeat(lambda: hf_once(peft, prompt, args.max_tokens), args.runs), "PEFT"
        )
        results["peft_lora"] = {
            "system": "transformers + PEFT generate, 1 adapter",
            **median_row(rows),
            "other_load": share,
        }
    checks.append(cpu_check("end"))

    agreement = {
        "loraplex_base_vs_hf_base": outputs["loraplex_base"] == outputs["hf_base"],
        "loraplex_lora_vs_peft_lora": outputs["loraplex_lora"] == outputs["peft_lora"],
        "inline_same_as_threaded": outputs["loraplex_base_inline"] == outputs["loraplex_base"]
        and outputs["loraplex_lora_inline"] == outputs["loraplex_lora"],
        "adapter_changes_output": outputs["loraplex_lora"] != outputs["loraplex_base"],
    }
    ratios = {
        "loraplex_base/hf_base": results["loraplex_base"]["decode_tok_s"] / results["hf_base"]["decode_tok_s"],
        "loraplex_lora/hf_base": results["loraplex_lora"]["decode_tok_s"] / results["hf_base"]["decode_tok_s"],
        "loraplex_lora/peft_lora": results["loraplex_lora"]["decode_tok_s"] / results["peft_lora"]["decode_tok_s"],
        "loraplex_lora/loraplex_base": results["loraplex_lora"]["decode_tok_s"]
        / results["loraplex_base"]["decode_tok_s"],
        "loraplex_base_inline/hf_base": results["loraplex_base_inline"]["decode_tok_s"]
        / results["hf_base"]["decode_tok_s"],
        "loraplex_lora_inline/peft_lora": results["loraplex_lora_inline"]["decode_tok_s"]
        / results["peft_lora"]["decode_tok_s"],
        "loraplex_base_inline/loraplex_base": results["loraplex_base_inline"]["decode_tok_s"]
        / results["loraplex_base"]["decode_tok_s"],
    }
    ratios = {k: round(v, 2) for k, v in ratios.items()}

    print()
    header = (
        f"{'system':<56} {'tokens':>6} {'TTFT ms':>8} {'decode tok/s':>12} {'ms/token':>9} {'others':>6}  runs (tok/s)"
    )
    print(header)
    print("-" * len(header))
    for r in results.values():
        runs = ", ".join(f"{v:.1f}" for v in r["decode_tok_s_all_runs"])
        print(
            f"{r['system']:<56} {r['tokens']:>6} {r['ttft_s'] * 1e3:>8.1f} {r['decode_tok_s']:>12.1f} "
            f"{1e3 / r['decode_tok_s']:>9.2f} {r['other_load']:>6.0%}  {runs}"
        )
    print()
    for k, v in ratios.items():
        print(f"ratio {k:<36} {v:>6.2f}x")
    print("(others = share of the machine's CPU used by other processes during that system's runs; want ~0%)")
    for k, v in agreement.items():
        print(f"{k:<30} {v}")
    problems = [
        f"{k}: {r['tokens']} tokens, not {args.max_tokens}"
        for k, r in results.items()
        if r["tokens"] != args.max_tokens
    ]
    problems += [f"check failed: {k}" for k, v in agreement.items() if not v]
    problems += [f"CPU contended at {c['label']}" for c in checks if c["contended"]]
    problems += [
        f"{k}: other processes used {r['other_load']:.0%} of the CPUs during the measurement"
        for k, r in results.items()
        if r["other_load"] > 0.1
    ]
    for p in problems:
        print(f"!! {p}")
    total = time.perf_counter() - started
    print(f"total script time {total:.0f} s")
    write_json(
        args.out,
        {
            "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "prompt": {"text": PROMPT, "tokens": len(prompt)},
            "loraplex_backend": backend,
            "results": results,
            "ratios": ratios,
            "agreement": agreement,
            "cpu_checks": checks,
            "problems": problems,
            "script_seconds": round(total, 1),
        },
    )


if __name__ == "__main__":
    main()
