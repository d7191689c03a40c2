"""Prefix caching and KV on demand on the default model, measured in one run.

Part 1, a shared system prompt. ``--requests`` chat requests (the model's chat
template) share one system prompt of about ``--system-tokens`` tokens and each
ask their own question; they go round-robin over ``--adapters`` rank-16
adapters and the base model, from ``--clients`` closed-loop clients (each sends
its next request when its last one ended), exactly ``--max-tokens`` tokens each.
The same workload runs on two engines built alike but for prefix caching, off
then on, ``--rounds`` times: time to first token (p50, p90) and output
throughput, with the cache on against off.

Part 2, long ``max_tokens``. ``--long-requests`` chat requests ask for up to
``--long-max-tokens`` tokens (the chat API's default is 1024) and stop at the
model's end of turn, all submitted at once to an engine with a
``--long-kv-tokens`` cache and a sequence limit of 128 (so that it does not
bind first). Reserving prompt + max_tokens at admission, as the engine did
before KV on demand, admits at most cache blocks // blocks per request at once
(the bound printed); the engine now takes blocks as sequences grow. The
requests running at once are sampled from the engine's gauge.

Run: ``python -m loadtests.bench.prefix_cache [--requests 200] [--rounds 2]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from loadtests.bench.common import CACHE_DIR, cpu_check, load_default, make_adapters, setup_torch, write_json
from loadtests.plots import plt
from server.engine.builder import Serving
from server.engine.request import SamplingParams
from tests.helpers import engine as eng

RESULTS = Path(__file__).resolve().parents[1] / "results" / "prefix_cache.json"
TOPICS = ("adapters", "batching", "tokenizers", "attention", "quantization", "caching", "schedulers", "metrics",
          "sampling", "rope", "kernels", "latency")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--system-tokens", type=int, default=500)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--long-requests", type=int, default=96)
    p.add_argument("--long-max-tokens", type=int, default=1024)
    p.add_argument("--long-kv-tokens", type=int, default=32768)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


def system_prompt(tokenizer, tokens: int) -> str:
    """House rules of a made-up support desk, numbered, until they reach ``tokens`` tokens."""
    rules = ["You are the support assistant of a company that serves many fine-tuned language models at once."]
    i = 0
    while len(tokenizer(" ".join(rules))["input_ids"]) < tokens:
        i += 1
        topic = TOPICS[i % len(TOPICS)]
        rules.append(f"Rule {i}: when a customer asks about {topic}, answer in plain words, cite the manual's "
                     f"section {i}.{i % 7}, and never promise a date.")
    return " ".join(rules)


def chat_ids(tokenizer, system: str, question: str) -> list[int]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def closed_loop(serving: Serving, prompts: list[list[int]], adapters: list[str | None], clients: int,
                params: SamplingParams) -> dict:
    """Each of ``clients`` threads sends its share of the requests one after another; TTFT from submission."""
    ttft: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def client(k: int) -> None:
        for i in range(k, len(prompts), clients):
            t = time.perf_counter()
            sink = eng.submit(serving, f"c{k}-{i}-{t}", prompts[i], adapters[i], params)
            sink.done.wait(600)
            assert sink.error is None, sink.error
            with lock:
                ttft.append(sink.times[0] - t)
                tokens[0] += len(sink.token_ids)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    ttft.sort()
    return {
        "ttft_p50_ms": round(1000 * statistics.median(ttft), 1),
        "ttft_p90_ms": round(1000 * ttft[int(0.9 * (len(ttft) - 1))], 1),
        "tok_s": round(tokens[0] / wall, 1),
        "wall_s": round(wall, 2),
        "ttft_ms": [round(1000 * x, 1) for x in ttft],
    }


def counter(serving: Serving, name: str) -> float:
    assert serving.metrics is not None
    return serving.metrics.registry.get_sample_value(name) or 0.0


def shared_prefix(loaded, store: Path, names: list[str], args) -> dict:
    tok = loaded.tokenizer
    system = system_prompt(tok, args.system_tokens)
    prompts = [chat_ids(tok, system, f"Question {i}: what should I know about {TOPICS[i % len(TOPICS)]} "
                                     f"before my call number {i}?") for i in range(args.requests)]
    choices: list[str | None] = [*names, None]
    adapters = [choices[i % len(choices)] for i in range(args.requests)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    kv = 16384
    servings = {caching: eng.build(loaded.hf_model, tok, store, CACHE_DIR, max_rank=16, kv_tokens=kv,
                                   prefix_caching=caching) for caching in (False, True)}
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    try:
        for serving in servings.values():
            serving.engine.start()
            eng.submit(serving, "warm", prompts[0][:8], None, params).done.wait(60)
        for rnd in range(args.rounds):
            for caching, serving in servings.items():
                label = "on" if caching else "off"
                hits0, queries0 = (counter(serving, f"loraplex_prefix_cache_{k}_tokens_total") for k in ("hits",
                                                                                                     "queries"))
                result = closed_loop(serving, prompts, adapters, args.clients, params)
                hits = counter(serving, "loraplex_prefix_cache_hits_tokens_total") - hits0
                queries = counter(serving, "loraplex_prefix_cache_queries_tokens_total") - queries0
                result["cached_share"] = round(hits / queries, 3) if queries else 0.0
                runs[label].append(result)
                print(f"  round {rnd} cache {label}: TTFT p50 {result['ttft_p50_ms']} ms, p90 "
                      f"{result['ttft_p90_ms']} ms, {result['tok_s']} tok/s, cached {result['cached_share']:.0%}",
                      flush=True)
    finally:
        for serving in servings.values():
            serving.stop()
    summary = {label: {k: statistics.median(r[k] for r in rs) for k in ("ttft_p50_ms", "ttft_p90_ms", "tok_s")}
               for label, rs in runs.items()}
    return {
        "system_prompt_tokens": len(tok(system)["input_ids"]),
        "prompt_tokens_mean": round(statistics.mean(len(p) for p in prompts), 1),
        "requests": args.requests,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "adapters": len(names),
        "kv_cache_tokens": kv,
        "runs": runs,
        "summary": summary,
        "ttft_p50_ratio_off_over_on": round(summary["off"]["ttft_p50_ms"] / summary["on"]["ttft_p50_ms"], 2),
        "throughput_ratio_on_over_off": round(summary["on"]["tok_s"] / summary["off"]["tok_s"], 2),
    }


def long_outputs(loaded, store: Path, names: list[str], args) -> dict:
    tok = loaded.tokenizer
    prompts = [chat_ids(tok, "You are a helpful assistant.", f"In two sentences, what is {TOPICS[i % len(TOPICS)]} "
                                                              f"in a language model server? ({i})")
               for i in range(args.long_requests)]
    choices: list[str | None] = [*names, None]
    adapters = [choices[i % len(choices)] for i in range(args.long_requests)]
    params = SamplingParams(max_tokens=args.long_max_tokens, temperature=0.0)
    serving = eng.build(loaded.hf_model, tok, store, CACHE_DIR, max_rank=16, kv_tokens=args.long_kv_tokens,
                        max_num_seqs=128)
    blocks = serving.engine.scheduler.blocks
    per_request = max(blocks.blocks_for(len(p) + args.long_max_tokens) for p in prompts)
    reserved_bound = blocks.num_blocks // per_request
    samples: list[tuple[float, float]] = []
    serving.engine.start()
    try:
        eng.submit(serving, "warm", prompts[0][:8], None, SamplingParams(max_tokens=2)).done.wait(60)
        t0 = time.perf_counter()
        sinks = [eng.submit(serving, f"long-{i}", prompts[i], adapters[i], params) for i in range(len(prompts))]
        while not all(s.done.is_set() for s in sinks):
            samples.append((time.perf_counter() - t0, counter(serving, "loraplex_requests_running")))
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        preemptions = counter(serving, "loraplex_preemptions_total")
    finally:
        serving.stop()
    assert all(s.error is None for s in sinks), [s.error for s in sinks if s.error]
    lengths = [len(s.token_ids) for s in sinks]
    peak = max(n for _, n in samples)
    busy = [n for _, n in samples if n > 0]
    return {
        "requests": len(prompts),
        "max_tokens": args.long_max_tokens,
        "kv_cache_tokens": args.long_kv_tokens,
        "prompt_tokens_max": max(len(p) for p in prompts),
        "output_tokens_mean": round(statistics.mean(lengths), 1),
        "output_tokens_max": max(lengths),
        "reservation_bound": reserved_bound,
        "running_peak": peak,
        "running_mean": round(statistics.mean(busy), 1),
        "concurrency_ratio": round(peak / reserved_bound, 2),
        "preemptions": preemptions,
        "wall_s": round(wall, 2),
        "tok_s": round(sum(lengths) / wall, 1),
        "running_samples": [(round(t, 2), n) for t, n in samples[::5]],
    }


def plot(results: dict, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.4))
    shared = results["shared_prefix"]
    for label in ("off", "on"):
        values = sorted(x for run in shared["runs"][label] for x in run["ttft_ms"])
        left.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post",
                  label=f"prefix cache {label} (p50 {shared['summary'][label]['ttft_p50_ms']:.0f} ms)")
    left.set_xscale("log")
    left.set_xlabel("time to first token (ms)")
    left.set_ylabel("fraction of requests")
    left.set_title(f"{shared['requests']} chat requests, {shared['system_prompt_tokens']}-token shared system "
                   f"prompt,\n{shared['adapters']} adapters + base, {shared['clients']} clients", fontsize=9)
    left.legend(loc="lower right")
    left.grid(alpha=0.3)
    long = results["long_outputs"]
    t, n = zip(*long["running_samples"], strict=True)
    right.plot(t, n, label="running (KV on demand)")
    right.axhline(long["reservation_bound"], color="red", linestyle="--",
                  label=f"bound when reserving prompt + max_tokens ({long['reservation_bound']})")
    right.set_xlabel("seconds")
    right.set_ylabel("requests running at once")
    right.set_title(f"{long['requests']} chat requests, max_tokens {long['max_tokens']}, "
                    f"KV cache {long['kv_cache_tokens']} tokens", fontsize=9)
    right.legend(loc="upper right")
    right.grid(alpha=0.3)
    fig.suptitle(f"prefix cache and KV on demand ({results['environment']['cpu']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    setup_torch()
    loaded = load_default()
    with tempfile.TemporaryDirectory(prefix="loraplex-prefix-") as tmp:
        store = Path(tmp)
        names = make_adapters(loaded, store, args.adapters, rank=16, seed=7)
        check = cpu_check("before")
        print(f"part 1: {args.requests} chat requests sharing a system prompt, cache off vs on", flush=True)
        shared = shared_prefix(loaded, store, names, args)
        print(f"part 2: {args.long_requests} requests with max_tokens {args.long_max_tokens}", flush=True)
        long = long_outputs(loaded, store, names, args)
        after = cpu_check("after")
    print(f"shared prefix: TTFT p50 off {shared['summary']['off']['ttft_p50_ms']} ms, on "
          f"{shared['summary']['on']['ttft_p50_ms']} ms -> {shared['ttft_p50_ratio_off_over_on']}x lower; "
          f"throughput {shared['throughput_ratio_on_over_off']}x")
    print(f"long max_tokens: {long['running_peak']:.0f} running at once (mean {long['running_mean']}), reserving "
          f"would admit {long['reservation_bound']} -> {long['concurrency_ratio']}x; {long['preemptions']:.0f} "
          f"preemptions")
    write_json(args.out, {"cpu_check": {"before": check, "after": after}, "shared_prefix": shared,
                          "long_outputs": long})
    plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
