"""End-to-end throughput: loraplex's mixed-adapter batching against the two PEFT baselines.

The same work for every system, on the default model (SmolLM2-135M, fp32, CPU):
``--requests`` greedy requests spread round-robin over ``--adapters`` rank
``--rank`` adapters on all seven projections, prompts of ``--prompt-tokens``
random token ids, exactly ``--max-tokens`` new tokens each (EOS does not stop
a request: ``ignore_eos`` in loraplex, ``eos_token_id=None`` in transformers,
so EOS is neither a stop nor suppressed and greedy outputs stay comparable).

Systems:

* loraplex: our engine in-process (no HTTP), all requests submitted at once,
  LoRA backend ``torch`` and, when it builds, ``cpu`` (the C kernel);
* PEFT swapping: one ``PeftModel`` holding all adapters; per adapter group
  ``set_adapter`` then ``generate`` on that group's requests (the S-LoRA
  paper's PEFT baseline);
* PEFT mixed batch: ``generate(..., adapter_names=[...])`` over batches of
  all requests and of 16; the faster is the baseline.

Generated tokens/s = generated tokens / wall time. Greedy outputs are compared
request by request; a disagreement is examined at its first differing token
with an unpadded, unbatched PEFT forward pass (the top-2 logit margin there
tells a near-tie from a bug).

Run: ``python -m loadtests.bench.engine_vs_peft [--requests 64] [--adapters 16] ...``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel

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
from server.engine.request import FinishReason, Request, SamplingParams
from server.lora import cpu_kernel
from server.model.loading import LoadedModel
from tests.helpers import engine as eng


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("loadtests/results/engine_vs_peft.json"))
    return p.parse_args()


@dataclass
class Work:
    prompts: list[list[int]]
    adapters: list[str]  # per request
    max_tokens: int

    @property
    def groups(self) -> dict[str, list[int]]:
        """Request indices per adapter, in first-use order."""
        out: dict[str, list[int]] = {}
        for i, name in enumerate(self.adapters):
            out.setdefault(name, []).append(i)
        return out


@dataclass
class Result:
    system: str
    outputs: list[list[int]]
    wall_s: float
    notes: dict = field(default_factory=dict)

    @property
    def generated(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def tok_s(self) -> float:
        return self.generated / self.wall_s

    def exact_length(self, n: int) -> bool:
        return all(len(o) == n for o in self.outputs)

    def summary(self, max_tokens: int) -> dict:
        lengths = [len(o) for o in self.outputs]
        return {
            "system": self.system,
            "wall_s": round(self.wall_s, 3),
            "generated_tokens": self.generated,
            "tokens_per_s": round(self.tok_s, 2),
            "min_tokens_per_request": min(lengths),
            "max_tokens_per_request": max(lengths),
            "all_exactly_max_tokens": self.exact_length(max_tokens),
            **self.notes,
        }


def make_work(loaded: LoadedModel, args: argparse.Namespace, names: list[str]) -> Work:
    """Prompts of random ordinary token ids (no special tokens), from a seeded generator."""
    gen = torch.Generator().manual_seed(args.seed)
    special = set(loaded.tokenizer.all_special_ids)
    vocab = len(loaded.tokenizer)
    prompts = []
    for _ in range(args.requests):
        ids: list[int] = []
        while len(ids) < args.prompt_tokens:
            t = int(torch.randint(vocab, (1,), generator=gen))
            if t not in special:
                ids.append(t)
        prompts.append(ids)
    adapters = [names[i % len(names)] for i in range(args.requests)]
    return Work(prompts, adapters, args.max_tokens)


# -- loraplex ---------------------------------------------------------------------------------------


def _drive(
    serving: eng.Serving, work: Work, indices: list[int], max_tokens: int, tag: str, inline: bool
) -> list[TimedSink]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    sinks = []
    for i in indices:
        sink = TimedSink()
        stored = serving.store.get(work.adapters[i])
        serving.engine.submit(Request(f"{tag}-{i}", work.prompts[i], params, selection=Selection.of(stored)), sink)
        sinks.append(sink)
    if inline:
        step_inline(serving.engine)
    for i, sink in zip(indices, sinks, strict=True):
        if not sink.done.wait(600):
            raise RuntimeError(f"loraplex request {tag}-{i} did not finish in 600 s")
        if sink.error is not None:
            raise RuntimeError(f"loraplex request {tag}-{i} failed: {sink.error}")
    return sinks


def run_loraplex(
    loaded: LoadedModel, adapters_dir: Path, work: Work, rank: int, backend: str, runs: int, inline: bool = False
) -> Result:
    """Best of ``runs`` after a warm-up; ``inline``: step on this thread instead of the engine thread."""
    n = len(work.prompts)
    per_request = -(-(len(work.prompts[0]) + work.max_tokens) // 16) * 16
    serving = eng.build(
        loaded.hf_model,
        loaded.tokenizer,
        adapters_dir,
        CACHE_DIR,
        backend=backend,
        max_loras=max(16, len(set(work.adapters))),
        max_rank=rank,
        kv_tokens=max(4096, n * per_request),
        max_num_seqs=max(64, n),
    )
    if not inline:
        serving.engine.start()
    try:
        # Warm-up: every adapter loaded into host memory and a slot, first-call costs paid.
        first = list(work.groups.values())
        _drive(serving, work, [g[0] for g in first], 4, "warm", inline)
        walls, result = [], None
        for run in range(runs):
            steps0 = serving.engine.steps
            t0 = time.perf_counter()
            sinks = _drive(serving, work, list(range(n)), work.max_tokens, f"run{run}", inline)
            wall = time.perf_counter() - t0
            walls.append(wall)
            reasons = {s.outputs[-1].finish_reason for s in sinks}
            notes = {
                "backend": backend,
                "engine_thread": not inline,
                "engine_steps": serving.engine.steps - steps0,
                "finish_reasons": sorted(r.value for r in reasons if r is not None),
                "timed_runs_wall_s": None,
            }
            if reasons != {FinishReason.LENGTH}:
                print(f"  !! loraplex/{backend}: unexpected finish reasons {reasons}")
            label = f"loraplex ({backend}{', stepped inline' if inline else ''})"
            candidate = Result(label, [s.token_ids for s in sinks], wall, notes)
            if result is None or wall < result.wall_s:
                result = candidate
        assert result is not None
        result.notes["timed_runs_wall_s"] = [round(w, 3) for w in walls]
        return result
    finally:
        if not inline:
            serving.stop()


def run_loraplex_isolated(
    adapters_dir: Path, work: Work, rank: int, backend: str, runs: int, inline: bool
) -> Result:
    """:func:`run_loraplex` in a fresh process, as the server runs it."""
    return in_fresh_process(_child, adapters_dir, work, rank, backend, runs, inline)


def _child(adapters_dir: Path, work: Work, rank: int, backend: str, runs: int, inline: bool) -> Result:
    setup_torch()
    return run_loraplex(load_default(), adapters_dir, work, rank, backend, runs, inline)


# -- PEFT -------------------------------------------------------------------------------------------


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], max_new: int, pad_id: int, **kwargs) -> list[list[int]]:
    """Greedy ``generate`` over a left-padded batch; exactly ``max_new`` tokens per row (EOS does not stop)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=None,  # no EOS stop (and no EOS suppression): the same as ignore_eos
        pad_token_id=pad_id,
        **kwargs,
    )
    return out[:, width:].tolist()


def load_peft(adapters_dir: Path, names: list[str]) -> tuple[PeftModel, int]:
    loaded = load_default()
    model = PeftModel.from_pretrained(loaded.hf_model, adapters_dir / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters_dir / name, adapter_name=name)
    model.eval()
    pad = loaded.tokenizer.pad_token_id
    return model, loaded.tokenizer.eos_token_id if pad is None else pad


def run_peft_swap(model: PeftModel, pad: int, work: Work) -> Result:
    groups = work.groups
    name0, idx0 = next(iter(groups.items()))
    model.set_adapter(name0)
    hf_generate(model, [work.prompts[i] for i in idx0], 2, pad)  # warm-up
    outputs: list[list[int]] = [[] for _ in work.prompts]
    t0 = time.perf_counter()
    for name, idx in groups.items():
        model.set_adapter(name)
        for i, toks in zip(idx, hf_generate(model, [work.prompts[i] for i in idx], work.max_tokens, pad), strict=True):
            outputs[i] = toks
    wall = time.perf_counter() - t0
    batch_sizes = sorted({len(v) for v in groups.values()})
    return Result("PEFT swapping (set_adapter per group)", outputs, wall, {"group_batch_sizes": batch_sizes})


def run_peft_mixed(model: PeftModel, pad: int, work: Work, batch: int) -> Result:
    n = len(work.prompts)
    hf_generate(model, work.prompts[: min(batch, n)], 2, pad, adapter_names=work.adapters[: min(batch, n)])
    outputs: list[list[int]] = []
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        outputs += hf_generate(
            model, work.prompts[s : s + batch], work.max_tokens, pad, adapter_names=work.adapters[s : s + batch]
        )
    wall = time.perf_counter() - t0
    return Result(f"PEFT mixed batch (adapter_names, batch {batch})", outputs, wall, {"batch_size": batch})


# -- correctness --------------------------------------------------------------------------------------


def compare(a: Result, b: Result) -> tuple[int, list[tuple[int, int]]]:
    """How many requests agree exactly; (request, first differing position) for the others."""
    diffs = []
    for i, (x, y) in enumerate(zip(a.outputs, b.outputs, strict=True)):
        if x != y:
            k = next((j for j, (u, v) in enumerate(zip(x, y, strict=False)) if u != v), min(len(x), len(y)))
            diffs.append((i, k))
    return len(a.outputs) - len(diffs), diffs


@torch.inference_mode()
def examine(model: PeftModel, work: Work, ours: Result, ref: Result, diffs: list[tuple[int, int]]) -> list[dict]:
    """At each first divergence: the unbatched, unpadded PEFT logits after the common prefix."""
    rows = []
    for i, k in diffs:
        model.set_adapter(work.adapters[i])
        prefix = work.prompts[i] + ref.outputs[i][:k]
        logits = model(torch.tensor([prefix])).logits[0, -1].double()
        top2 = torch.topk(logits, 2)
        a, b = ours.outputs[i][k], ref.outputs[i][k]
        rows.append(
            {
                "request": i,
                "adapter": work.adapters[i],
                "first_diff_at": k,
                "loraplex_token": a,
                "peft_token": b,
                "unbatched_argmax": int(top2.indices[0]),
                "top2_margin": float(top2.values[0] - top2.values[1]),
                "logit_gap_peft_minus_loraplex": float(logits[b] - logits[a]),
            }
        )
    return rows


# -- main ---------------------------------------------------------------------------------------------


def matmul_ms() -> dict[str, float]:
    """A probe for the known slowdown of all torch matmuls once the kernel's library is loaded."""
    out = {}
    for m in (1, 64):
        x, w = torch.randn(m, 576), torch.randn(1536, 576)
        for _ in range(20):
            x @ w.T
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(100):
                x @ w.T
            best = min(best, (time.perf_counter() - t0) / 100 * 1e3)
        out[f"{m}x576x1536"] = round(best, 4)
    return out


def main() -> None:
    args = parse_args()
    setup_torch()
    started = time.perf_counter()
    checks = [cpu_check("start")]
    base = load_default()
    results: dict[str, Result] = {}
    problems: list[str] = []
    agreement: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        adapters_dir = Path(tmp)
        names = make_adapters(base, adapters_dir, args.adapters, args.rank, args.seed)
        work = make_work(base, args, names)
        print(
            f"{args.requests} requests over {args.adapters} rank-{args.rank} adapters (all 7 projections), "
            f"prompt {args.prompt_tokens} tokens, {args.max_tokens} new tokens each, greedy, "
            f"fp32, {torch.get_num_threads()} threads"
        )

        # PEFT baselines first: nothing has loaded the kernel library or started another torch thread yet.
        peft_model, pad = load_peft(adapters_dir, names)
        checks.append(cpu_check("before PEFT"))
        print("running PEFT swapping ...", flush=True)
        results["peft_swap"], share = quiet_run(lambda: run_peft_swap(peft_model, pad, work), "PEFT swapping")
        results["peft_swap"].notes["other_load"] = round(share, 3)
        for batch in sorted({args.requests, min(16, args.requests)}, reverse=True):
            print(f"running PEFT mixed batch {batch} ...", flush=True)
            results[f"peft_mixed_b{batch}"], share = quiet_run(
                lambda b=batch: run_peft_mixed(peft_model, pad, work, b), f"PEFT mixed batch {batch}"
            )
            results[f"peft_mixed_b{batch}"].notes["other_load"] = round(share, 3)
        mixed_key = max((k for k in results if k.startswith("peft_mixed")), key=lambda k: results[k].tok_s)

        # Still on the main thread only: does loading the kernel's library slow torch's matmuls?
        probe_before = matmul_ms()
        kernel_ok = cpu_kernel.available()
        probe_after = matmul_ms()
        kernel_info = {
            "available": kernel_ok,
            "matmul_ms_before_load": probe_before,
            "matmul_ms_after_load": probe_after,
        }
        for k, before in probe_before.items():
            if probe_after[k] > 1.5 * before:
                problems.append(f"loading the CPU kernel slowed a {k} matmul {before:.3f} -> {probe_after[k]:.3f} ms")
        backends = ["torch"]
        if kernel_ok:
            backends.append("cpu")
        else:
            problems.append("the CPU kernel is not available (build failed?): backend cpu not measured")

        checks.append(cpu_check("before loraplex"))
        for backend in backends:
            for inline in (False, True):
                key = f"loraplex_{backend}" + ("_inline" if inline else "")
                print(f"running loraplex ({backend}{', stepped inline' if inline else ''}) ...", flush=True)
                try:
                    results[key], share = quiet_run(
                        lambda b=backend, i=inline: run_loraplex_isolated(adapters_dir, work, args.rank, b, 2, i), key
                    )
                    results[key].notes["other_load"] = round(share, 3)
                except Exception as exc:  # report, and keep the other figures
                    problems.append(f"{key} failed: {exc!r}")
        ours = [k for k in results if k.startswith("loraplex")]

        # Correctness: loraplex against both PEFT runs; disagreements examined unbatched.
        for ours_key in ours:
            for ref_key in ("peft_swap", mixed_key):
                same, diffs = compare(results[ours_key], results[ref_key])
                agreement[f"{ours_key}_vs_{ref_key}"] = {
                    "exact": same,
                    "of": args.requests,
                    "divergences": examine(peft_model, work, results[ours_key], results[ref_key], diffs),
                }
        same, diffs = compare(results["peft_swap"], results[mixed_key])
        agreement[f"peft_swap_vs_{mixed_key}"] = {"exact": same, "of": args.requests, "first_diffs": diffs}
        # The agreement means something only if the adapters change the outputs: the base model's own.
        with peft_model.disable_adapter():
            base_out = hf_generate(peft_model, work.prompts, args.max_tokens, pad)
        changed = sum(o != b for o, b in zip(results["peft_swap"].outputs, base_out, strict=True))
        agreement["adapter_changes_output"] = {"changed": changed, "of": args.requests}

    checks.append(cpu_check("end"))
    problems += [f"CPU contended at {c['label']}" for c in checks if c["contended"]]
    problems += [
        f"{k}: other processes used {r.notes['other_load']:.0%} of the CPUs during the measurement"
        for k, r in results.items()
        if r.notes.get("other_load", 0.0) > 0.1
    ]
    for key, r in results.items():
        if not r.exact_length(args.max_tokens):
            problems.append(f"{key}: not every request produced exactly {args.max_tokens} tokens")

    print()
    header = f"{'system':<50} {'wall s':>8} {'tokens':>7} {'tok/s':>8} {'tok/req':>8} {'others':>7}"
    print(header)
    print("-" * len(header))
    for r in results.values():
        lengths = sorted({len(o) for o in r.outputs})
        per_req = str(lengths[0]) if len(lengths) == 1 else f"{lengths[0]}-{lengths[-1]}"
        others = f"{r.notes.get('other_load', 0.0):.0%}"
        print(f"{r.system:<50} {r.wall_s:>8.2f} {r.generated:>7} {r.tok_s:>8.1f} {per_req:>8} {others:>7}")
    print()
    ratios = {
        f"{o}/{ref}": round(results[o].tok_s / results[ref].tok_s, 2) for o in ours for ref in ("peft_swap", mixed_key)
    }
    for k, v in ratios.items():
        print(f"ratio {k:<42} {v:>6.2f}x")
    print(f"(PEFT mixed baseline = the faster batch size: {results[mixed_key].system})")
    print("(others = share of the machine's CPU used by other processes during that measurement; want ~0%)")
    print()
    for k, v in agreement.items():
        if k == "adapter_changes_output":
            print(f"adapters change the greedy output (vs the base model) of {v['changed']}/{v['of']} requests")
            continue
        print(f"agreement {k:<46} {v['exact']}/{v['of']} exact")
        for d in v.get("divergences", []):
            print(
                f"    request {d['request']:>3} ({d['adapter']}) first diff at token {d['first_diff_at']}: "
                f"loraplex {d['loraplex_token']} vs PEFT {d['peft_token']}, unbatched argmax "
                f"{d['unbatched_argmax']}, top-2 margin {d['top2_margin']:.2e}, "
                f"gap {d['logit_gap_peft_minus_loraplex']:.2e}"
            )
    print(f"cpu kernel: {kernel_info}")
    for p in problems:
        print(f"!! {p}")
    total = time.perf_counter() - started
    print(f"total script time {total:.0f} s")

    write_json(
        args.out,
        {
            "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "adapter": {"rank": args.rank, "alpha": 2 * args.rank, "std": 0.02, "targets": "all 7 projections"},
            "prompts": "random non-special token ids, seeded, identical for every system; equal lengths, so "
            "the HF batches need no padding",
            "loraplex_timing": "best of 2 timed runs after a warm-up that loads every adapter; all requests "
            "submitted at once; *_inline = stepped on the main thread instead of the engine thread (diagnostic)",
            "peft_timing": "one timed run after a short warm-up",
            "results": {k: r.summary(args.max_tokens) for k, r in results.items()},
            "peft_mixed_baseline": mixed_key,
            "ratios": ratios,
            "agreement": agreement,
            "cpu_kernel": kernel_info,
            "cpu_checks": checks,
            "problems": problems,
            "script_seconds": round(total, 1),
        },
    )


if __name__ == "__main__":
    main()
