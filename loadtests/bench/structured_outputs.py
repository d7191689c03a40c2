"""What structured outputs cost: decode throughput of a batch where half the requests follow a JSON schema,
against the same batch with none, on the default model, in one run. Beside it, the same batch with half the
requests using penalties, ``logit_bias`` and ``logprobs`` (5 alternatives) instead.

``--batch`` chat requests go round-robin over the base model and ``--adapters`` rank-16 adapters. In the guided
batch every second request carries a JSON schema (an object holding a list of at least 30 items, so no answer
ends before ``--max-tokens``); in the plain batch the same requests carry none and ignore EOS. Every request
then decodes exactly ``--max-tokens`` tokens, with the same prompts, in both. Decode throughput counts the
tokens after each request's first, over the time from the last first token to the last token. The batches
alternate for ``--rounds`` rounds; medians are compared. Grammar compile times (first and cached) are reported
beside.

Run: ``python -m loadtests.bench.structured_outputs [--batch 16] [--max-tokens 64] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jsonschema

from loadtests.bench.common import cpu_check, load_default, make_adapters, setup_torch, write_json
from loadtests.plots import plt
from server.engine.builder import Serving
from server.engine.grammar import GrammarSpec
from server.engine.request import Request, SamplingParams
from tests.helpers import engine as eng

RESULTS = Path(__file__).resolve().parents[1] / "results" / "structured_outputs.json"
SCHEMA = {
    "type": "object",
    "properties": {
        "store": {"type": "string", "maxLength": 30},
        "items": {"type": "array", "minItems": 30,
                  "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                                             "qty": {"type": "integer", "minimum": 1,
                                                                     "maximum": 99},
                                                             "unit": {"enum": ["kg", "g", "l", "piece"]}},
                            "required": ["name", "qty", "unit"]}},
    },
    "required": ["store", "items"],
}
ASKS = ("a grocery list for a week", "the stock of a hardware shop", "a bakery's morning order",
        "a camping trip's supplies", "a school canteen's delivery", "a florist's stock")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--adapters", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


def prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": f"Write {ASKS[i % len(ASKS)]} as JSON: a store name and items "
                                                f"with name, qty and unit."}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


PENALIZED = {"repetition_penalty": 1.2, "presence_penalty": 0.5, "frequency_penalty": 0.5, "logprobs": 5,
             "logit_bias": ((90, 2.0), (1000, -5.0))}


def run_batch(serving: Serving, ids: list[list[int]], models: list[str | None], kind: str, max_tokens: int,
              tag: str) -> dict:
    """``kind``: "plain", "guided" (every second request follows the schema) or "penalized" (every second
    request uses :data:`PENALIZED`)."""
    guided = kind == "guided"
    compiled = serving.grammars.compile(GrammarSpec("json", json.dumps(SCHEMA))) if guided else None
    sinks = []
    for i, (prompt, model) in enumerate(zip(ids, models, strict=True)):
        extra = PENALIZED if kind == "penalized" and i % 2 else {}
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **extra)
        sink = eng.Collected()
        grammar = serving.grammars.matcher(compiled) if compiled is not None and i % 2 else None
        request = Request(f"{tag}-{i}", prompt, params, selection=eng.selection_of(serving, model),
                              grammar=grammar)
        sinks.append((sink, grammar is not None, bool(extra)))
        serving.engine.submit(request, sink)
    for sink, *_ in sinks:
        assert sink.done.wait(600), tag
        assert sink.error is None, sink.error
    lengths = [len(s.token_ids) for s, *_ in sinks]
    assert all(n == max_tokens for n in lengths), lengths  # no answer ended early: equal work in both batches
    for sink, with_grammar, with_logprobs in sinks:  # the schema held (answers cut at max_tokens: not whole JSON)
        assert sink.text.startswith('{"store": "') == with_grammar, sink.text[:60]
        assert sum(len(o.logprobs) for o in sink.outputs) == (max_tokens if with_logprobs else 0)
    first = max(s.times[0] for s, *_ in sinks)
    last = max(s.times[-1] for s, *_ in sinks)
    seconds = last - first
    return {"decode_tok_s": round(len(sinks) * (max_tokens - 1) / seconds, 2), "decode_s": round(seconds, 3)}


def compile_times(serving: Serving) -> dict:
    """The vocabulary read (once per server, at its first grammar), then one schema compiled new and cached."""
    spec = GrammarSpec("json", json.dumps({**SCHEMA, "title": f"fresh-{time.time_ns()}"}))
    t0 = time.perf_counter()
    serving.grammars.compiler()
    t1 = time.perf_counter()
    serving.grammars.compile(spec)
    t2 = time.perf_counter()
    serving.grammars.compile(spec)
    t3 = time.perf_counter()
    return {"vocabulary_ms": round((t1 - t0) * 1e3, 1), "first_ms": round((t2 - t1) * 1e3, 2),
            "cached_ms": round((t3 - t2) * 1e3, 3)}


def finished_answer_is_valid(serving: Serving, ids: list[int]) -> bool:
    """One guided answer run to its end validates (the benchmark's answers are cut at max_tokens)."""
    schema = {**SCHEMA, "properties": {**SCHEMA["properties"], "items": {**SCHEMA["properties"]["items"],
                                                                          "minItems": 2, "maxItems": 3}}}
    compiled = serving.grammars.compile(GrammarSpec("json", json.dumps(schema)))
    sink = eng.Collected()
    serving.engine.submit(Request("valid", ids, SamplingParams(max_tokens=400, temperature=0.0),
                                      grammar=serving.grammars.matcher(compiled)), sink)
    assert sink.done.wait(600)
    jsonschema.validate(json.loads(sink.text), schema)
    return True


def plot(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    labels = ["plain", "half with a JSON schema", "half with penalties,\nlogit_bias, logprobs"]
    summary = results["summary"]
    values = [summary["plain_tok_s"], summary["guided_tok_s"], summary["penalized_tok_s"]]
    ax.bar(labels, values, color=["#4c72b0", "#dd8452", "#55a868"])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.1f} tok/s", ha="center", va="bottom")
    ax.set_ylabel("decode throughput (tokens/s)")
    ax.set_title(f"{results['batch']} requests (base + {results['adapters']} adapters), {results['max_tokens']} "
                 f"tokens each: schema cost {summary['cost']}x, penalties cost {summary['penalized_cost']}x\n"
                 f"({results['environment']['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    setup_torch()
    loaded = load_default()
    with tempfile.TemporaryDirectory(prefix="loraplex-structured-") as tmp:
        store = Path(tmp)
        names = make_adapters(loaded, store, args.adapters, rank=16, seed=11)
        serving = eng.build(loaded.hf_model, loaded.tokenizer, store, Path(tmp) / "cache", kv_tokens=16384,
                            max_rank=16)
        serving.engine.start()
        try:
            ids = prompts(loaded.tokenizer, args.batch)
            models = [([None, *names])[i % (len(names) + 1)] for i in range(args.batch)]
            check = cpu_check("before")
            compile_ms = compile_times(serving)
            runs: dict[str, list[dict]] = {"plain": [], "guided": [], "penalized": []}
            for r in range(args.rounds):
                for kind in runs:
                    runs[kind].append(run_batch(serving, ids, models, kind, args.max_tokens, f"{kind}-{r}"))
                    print(f"round {r + 1} {kind}: {runs[kind][-1]['decode_tok_s']} tok/s", flush=True)
            valid = finished_answer_is_valid(serving, ids[0])
            after = cpu_check("after")
        finally:
            serving.stop()
    plain = statistics.median(x["decode_tok_s"] for x in runs["plain"])
    guided = statistics.median(x["decode_tok_s"] for x in runs["guided"])
    penalized = statistics.median(x["decode_tok_s"] for x in runs["penalized"])
    summary = {"plain_tok_s": plain, "guided_tok_s": guided, "cost": round(plain / guided, 3), "goal": 1.2,
               "penalized_tok_s": penalized, "penalized_cost": round(plain / penalized, 3)}
    print(f"decode throughput: no schema {plain} tok/s, half with a schema {guided} tok/s -> cost "
          f"{summary['cost']}x (goal <= 1.2); half with penalties, logit_bias and logprobs {penalized} tok/s -> "
          f"cost {summary['penalized_cost']}x; grammar compile {compile_ms['first_ms']} ms first, "
          f"{compile_ms['cached_ms']} ms cached")
    write_json(args.out, {"batch": args.batch, "adapters": args.adapters, "max_tokens": args.max_tokens,
                          "rounds": args.rounds, "schema": SCHEMA, "compile": compile_ms, "runs": runs,
                          "summary": summary, "finished_answer_validates": valid,
                          "cpu_check": {"before": check, "after": after}})
    plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
