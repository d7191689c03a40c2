"""The loraplex-against-llama.cpp benchmark's bookkeeping: which systems meet on which workloads, rows, table."""

from __future__ import annotations

import os

from loadtests.bench.vs_llama_cpp import _reason
from loadtests.bench.vs_llama_cpp_plan import FULL, LORAPLEX_ARGS, QUICK, SAME_PRECISION, plan
from loadtests.bench.vs_llama_cpp_table import markdown, rows
from loadtests.cpu_share import OthersShare, _process_cpu_s


def labels(phases) -> list[tuple[str, list[str]]]:
    return [(p.name, [s.label for s in p.systems]) for p in phases]


def test_the_full_plan_interleaves_each_loraplex_precision_with_its_llama_twin():
    phases = plan(FULL, ["f32", "bf16", "q8_0", "q4_1"])
    assert labels(phases) == [
        ("one stream, float32", ["loraplex float32", "llama.cpp f32"]),
        ("one stream, bfloat16", ["loraplex bfloat16", "llama.cpp bf16"]),
        ("one stream, int8", ["loraplex int8", "llama.cpp q8_0"]),
        ("one stream, q4_1", ["loraplex q4_1", "llama.cpp q4_1", "loraplex q4_1_exact"]),
        ("concurrent, base", ["loraplex float32", "llama.cpp f32"]),
        ("concurrent, adapters", ["loraplex float32", "llama.cpp f32", "loraplex q4_1", "llama.cpp q4_1"]),
    ]
    assert set(SAME_PRECISION) == set(LORAPLEX_ARGS)
    single, many = phases[0], phases[-1]
    assert [(w.name, lp.label, peer.label) for w, lp, peer in many.comparisons()] == [
        (many.workloads[0].name, "loraplex float32", "llama.cpp f32"),
        (many.workloads[0].name, "loraplex q4_1", "llama.cpp q4_1"),
        (many.workloads[0].name, "loraplex float32", "llama.cpp q4_1"),
    ]
    assert single.concurrency == 1 and many.concurrency == 16
    spec = many.workloads[0].spec
    assert (spec.num_requests, spec.num_adapters, spec.base_share) == (64, 16, 0.0)
    assert spec.prompt_len == (128, 128) and spec.output_len == (128, 128)
    base = phases[4].workloads[0].spec
    assert base.num_adapters == 0 and base.base_share == 1.0
    assert [w.spec.num_adapters for w in single.workloads] == [0, 1]
    assert many.workloads[0].warmup.num_requests == 16 and many.workloads[0].warmup.seed == spec.seed + 1


def test_asking_for_fewer_precisions_drops_their_phases():
    assert labels(plan(QUICK, ["f32"])) == [
        ("one stream, float32", ["loraplex float32", "llama.cpp f32"]),
        ("concurrent, base", ["loraplex float32", "llama.cpp f32"]),
        ("concurrent, adapters", ["loraplex float32", "llama.cpp f32"]),
    ]
    assert labels(plan(QUICK, ["q4_1"])) == [
        ("one stream, q4_1", ["loraplex q4_1", "llama.cpp q4_1", "loraplex q4_1_exact"]),
        ("concurrent, adapters", ["loraplex q4_1", "llama.cpp q4_1", "loraplex float32"]),
    ]
    assert plan(QUICK, ["f32"])[-1].concurrency == 4


def run(workload: str, system: str, tok_s: float, ttft: float, **extra) -> dict:
    return {
        "workload": workload,
        "system": system,
        "output_throughput": tok_s,
        "decode_tok_s": tok_s * 1.1,
        "median_ttft_ms": ttft,
        "p99_ttft_ms": ttft * 2,
        "median_tpot_ms": 1000 / (tok_s * 1.1),
        "total_input_tokens": 260,
        "completed": 2,
        "failed": 0,
    } | extra


def test_rows_take_medians_over_rounds_and_ratios_loraplex_over_llama():
    phases = plan(QUICK, ["f32", "q4_1"])
    many = phases[-1].workloads[0].name
    runs = [
        run(many, "loraplex float32", 100.0, 50.0, round=1),
        run(many, "loraplex float32", 120.0, 70.0, round=2),
        run(many, "loraplex float32", 110.0, 60.0, round=3),
        run(many, "llama.cpp f32", 50.0, 30.0),
        {"workload": many, "system": "llama.cpp q4_1", "skipped": "exited with 1 ... bad flag"},
    ]
    table = {(r["workload"], r["loraplex"], r["llama_cpp"]): r for r in rows(phases, runs)}
    # one stream f32, q4_1 and q4_1_exact (2 workloads each), concurrent base, adapters
    assert len(table) == 3 * 2 + 1 + 3
    f32 = table[(many, "loraplex float32", "llama.cpp f32")]
    assert f32["loraplex_output_throughput"] == 110.0 and f32["llama_cpp_output_throughput"] == 50.0
    assert f32["ratio_output_throughput"] == 2.2 and f32["ratio_median_ttft"] == 2.0
    assert f32["loraplex_mean_prompt_tokens"] == 130.0
    assert f32["loraplex_completed_failed"] == [6, 0]
    q4 = table[(many, "loraplex float32", "llama.cpp q4_1")]
    assert q4["llama_cpp_skipped"] == "exited with 1 ... bad flag" and q4["ratio_output_throughput"] is None
    text = markdown(list(table.values()))
    assert "| 2.20x |" in text and "llama.cpp q4_1 (skipped)" in text
    assert text.count("\n") == len(table) + 1


def test_a_refused_start_is_told_by_its_error_line():
    log = "['python', '-m', 'server.cli'] exited with 2:\nusage: loraplex serve ...\n"
    log += "loraplex serve: error: unrecognized arguments: --quantization int8\nbye"
    assert _reason(RuntimeError(log)) == (
        "['python', '-m', 'server.cli'] exited with 2: ... loraplex serve: error: unrecognized arguments: "
        "--quantization int8"
    )
    assert _reason(TimeoutError("url not up after 300 s:\nlast line")) == "url not up after 300 s: ... last line"
    assert _reason(RuntimeError("")) == "RuntimeError"


def test_the_named_server_and_this_process_are_not_others():
    busy = sum(i * i for i in range(200_000))  # some CPU of our own
    assert busy and _process_cpu_s(os.getpid()) > 0 and _process_cpu_s(2**22 + 1) == 0.0
    with OthersShare(os.getpid()) as share:
        sum(i * i for i in range(2_000_000))
    assert 0.0 <= share.share <= 1.0
