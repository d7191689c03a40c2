"""Adapter tiers on the default model: how fast a cold adapter is ready, and what 1,000 adapters cost.

Part 1, cold start. The store holds rank-16 adapters of two shapes: PEFT's
default Llama targets (``q_proj``, ``v_proj``) and all seven projections. For
``--cold`` adapters of each shape never seen before, one request each on an
otherwise idle engine: the adapter cache's own timers give disk -> host (read
the file, check every value finite, wrap as tensors; the file is in the page
cache, as right after an upload) and host -> device (copy into a slot); the
request's time to first token is compared with the same request once the
adapter sits on a slot. The goal is "ready in under one decode step": the
decode step is measured too (single stream, base model).

Part 2, throughput. ``--requests`` greedy requests (``--prompt-tokens`` random
ids, exactly ``--max-tokens`` new tokens) submitted at once, in two workloads
that alternate ``--rounds`` times in one process: "8 hot" (round-robin over 8
adapters already on slots) and "1,000 in rotation" (round-robin over 1,000
stored adapters, each phase starting where the last stopped, so every request
names an adapter that is only on disk). Same engine, same slots (``--max-loras``).

Run: ``python -m loadtests.bench.adapter_tiers [--requests 256] [--rounds 2]``
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adapters_store.local import LocalAdapterStore
from loadtests.bench.common import CACHE_DIR, PROJECTIONS, cpu_check, load_default, setup_torch, write_json
from server.adapters.commands import TakeSnapshot
from server.adapters.selection import Selection
from server.engine.request import Request, SamplingParams
from tests.helpers import engine as eng
from tests.helpers.tiny import AdapterSpec, make_adapter

RESULTS = Path(__file__).resolve().parents[1] / "results" / "adapter_tiers.json"
SHAPES = {"qv": ("q_proj", "v_proj"), "all7": PROJECTIONS}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--cold", type=int, default=8, help="cold adapters measured per shape")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-loras", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


def fill_store(loaded, root: Path, count: dict[str, int]) -> dict[str, list[str]]:
    """PEFT-made templates (rank 16), then PEFT-format copies with their own random weights, stored via the store."""
    store = LocalAdapterStore(root)
    store.recover()
    names: dict[str, list[str]] = {}
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for shape, n in count.items():
            template = make_adapter(loaded.hf_model, AdapterSpec(shape, 16, 32.0, SHAPES[shape]), Path(tmp), seed=1)
            tensors = load_file(template / "adapter_model.safetensors")
            config = (template / "adapter_config.json").read_text()
            names[shape] = []
            for i in range(n):
                with store.staging() as staged:
                    weights = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in tensors.items()}
                    save_file(weights, staged / "adapter_model.safetensors")
                    (staged / "adapter_config.json").write_text(config)
                    store.put(f"{shape}-{i:04d}", staged)
                names[shape].append(f"{shape}-{i:04d}")
                if (i + 1) % 200 == 0:
                    print(f"  stored {i + 1}/{n} {shape} adapters", flush=True)
    return names


def submit_and_wait(serving, prompts: list[list[int]], adapters: list[str | None], max_tokens: int) -> list:
    sinks = []
    for i, (prompt, name) in enumerate(zip(prompts, adapters, strict=True)):
        stored = serving.store.get(name) if name else None
        sink = eng.Collected()
        sink.started = time.perf_counter()
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        request = Request(f"r{time.monotonic_ns()}-{i}", prompt, params, selection=Selection.of(stored))
        serving.engine.submit(request, sink)
        sinks.append(sink)
    for sink in sinks:
        if not sink.done.wait(600):
            raise TimeoutError("a request did not finish")
        if sink.error:
            raise RuntimeError(sink.error)
    return sinks


def cold_start(serving, names: dict[str, list[str]], cold: int, prompt: list[int]) -> dict:
    out = {}
    for shape, shape_names in names.items():
        rows = []
        for name in shape_names[-cold:]:
            [cold_sink] = submit_and_wait(serving, [prompt], [name], 1)
            [warm_sink] = submit_and_wait(serving, [prompt], [name], 1)
            snapshot = serving.engine.send(TakeSnapshot()).result()
            stats = snapshot.records[serving.store.get(name).key]
            rows.append(
                {
                    "adapter": name,
                    "disk_to_host_ms": stats.last_load_s * 1000,
                    "host_to_device_ms": stats.last_activation_s * 1000,
                    "ttft_cold_ms": (cold_sink.times[0] - cold_sink.started) * 1000,
                    "ttft_on_slot_ms": (warm_sink.times[0] - warm_sink.started) * 1000,
                }
            )
        med = {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0] if k != "adapter"}
        med["ready_ms"] = round(med["disk_to_host_ms"] + med["host_to_device_ms"], 2)
        med["adapter_mb"] = round(
            sum(
                t.numel() * 4
                for t in load_file(serving.store.get(shape_names[0]).path / "adapter_model.safetensors").values()
            )
            / 1e6,
            2,
        )
        out[shape] = {"median": med, "runs": rows}
        print(f"  {shape}: {json.dumps(med)}", flush=True)
    return out


def decode_step_ms(serving, prompt: list[int]) -> float:
    [sink] = submit_and_wait(serving, [prompt], [None], 64)
    gaps = [b - a for a, b in zip(sink.times[8:], sink.times[9:], strict=False)]
    return round(statistics.median(gaps) * 1000, 2)


def main() -> None:
    args = parse_args()
    setup_torch()
    loaded = load_default()
    rng = random.Random(0)
    vocab = len(loaded.tokenizer)
    prompts = [[rng.randrange(100, vocab) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
    with tempfile.TemporaryDirectory(prefix="loraplex-tiers-") as tmp:
        root = Path(tmp) / "store"
        t0 = time.perf_counter()
        names = fill_store(loaded, root, {"qv": args.adapters + 8, "all7": args.cold})
        print(f"stored {sum(map(len, names.values()))} adapters in {time.perf_counter() - t0:.0f} s", flush=True)
        serving = eng.build(
            loaded.hf_model,
            loaded.tokenizer,
            root,
            CACHE_DIR,
            max_loras=args.max_loras,
            max_rank=16,
            kv_tokens=max(8192, args.requests * -(-(args.prompt_tokens + args.max_tokens) // 16) * 16),
            max_num_seqs=max(64, args.max_loras),
        )
        serving.engine.start()
        try:
            check = cpu_check("before")
            hot, pool = names["qv"][:8], names["qv"][8 : 8 + args.adapters]
            step_ms = decode_step_ms(serving, prompts[0])
            print(f"decode step (batch 1, base): {step_ms} ms", flush=True)
            cold = cold_start(serving, {"qv": pool[-args.cold :], "all7": names["all7"]}, args.cold, prompts[0])
            pool = pool[: -args.cold]  # those are warm now
            submit_and_wait(serving, prompts[:8], hot, 2)  # the 8 hot adapters onto slots
            phases = []
            offset = 0
            for rnd in range(args.rounds):
                for label in ("8 hot", f"{args.adapters} in rotation"):
                    if label == "8 hot":
                        chosen = [hot[i % 8] for i in range(args.requests)]
                    else:
                        chosen = [pool[(offset + i) % len(pool)] for i in range(args.requests)]
                        offset += args.requests
                    t = time.perf_counter()
                    sinks = submit_and_wait(serving, prompts, chosen, args.max_tokens)
                    wall = time.perf_counter() - t
                    tokens = sum(len(s.token_ids) for s in sinks)
                    phases.append(
                        {
                            "round": rnd,
                            "workload": label,
                            "distinct_adapters": len(set(chosen)),
                            "wall_s": round(wall, 3),
                            "tok_s": round(tokens / wall, 1),
                        }
                    )
                    print(f"  round {rnd} {label}: {tokens / wall:.1f} tok/s", flush=True)
            hot_tps = statistics.mean(p["tok_s"] for p in phases if p["workload"] == "8 hot")
            rot_tps = statistics.mean(p["tok_s"] for p in phases if p["workload"] != "8 hot")
            snapshot = serving.engine.send(TakeSnapshot()).result()
            host = {
                "host_bytes": snapshot.host_bytes,
                "host_bytes_limit": snapshot.host_bytes_limit,
                "loads": sum(r.loads for r in snapshot.records.values()),
            }
            after = cpu_check("after")
        finally:
            serving.stop()
    ratio = rot_tps / hot_tps
    print(
        f"decode step {step_ms} ms; cold rank-16 ready: q,v {cold['qv']['median']['ready_ms']} ms, "
        f"all seven {cold['all7']['median']['ready_ms']} ms"
    )
    print(f"throughput: 8 hot {hot_tps:.1f} tok/s, {args.adapters} in rotation {rot_tps:.1f} tok/s -> {ratio:.3f}x")
    write_json(
        args.out,
        {
            "config": vars(args) | {"out": str(args.out)},
            "decode_step_ms": step_ms,
            "cold_start": cold,
            "throughput": {
                "phases": phases,
                "hot8_tok_s": round(hot_tps, 1),
                "rotation_tok_s": round(rot_tps, 1),
                "ratio": round(ratio, 3),
            },
            "host_tier": host,
            "cpu_checks": [check, after],
        },
    )


if __name__ == "__main__":
    main()
