"""The load generator: its workload plan (pure), and a few-second smoke run against a real tiny-model server."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from loadtests.client import check_loopback
from loadtests.report import METRICS, STATS
from loadtests.run import main
from loadtests.workload import WorkloadSpec, adapter_indices, arrival_times, build_plan, load_prompts
from server.native import cpu_isa
from tests.helpers.server_process import running_server
from tests.helpers.tiny import AdapterSpec, make_adapter
from tests.helpers.tiny_server import save_tiny_model

N = 20_000
VLLM_KEYS = ["completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput"]
VLLM_KEYS += [f"{s}_{m}_ms" for s in STATS for m in METRICS]


# ---- the workload plan --------------------------------------------------------------------------------------------


def test_same_seed_same_plan_other_seed_other_plan():
    spec = WorkloadSpec(num_adapters=8, alpha=0.5, base_share=0.2, rate=5, num_requests=200, seed=3)
    assert build_plan(spec) == build_plan(spec)
    other = build_plan(WorkloadSpec(num_adapters=8, alpha=0.5, base_share=0.2, rate=5, num_requests=200, seed=4))
    assert other != build_plan(spec)


def test_popularity_does_not_move_arrivals_or_lengths():
    a = build_plan(WorkloadSpec(num_adapters=8, alpha=1.0, num_requests=50, seed=1))
    b = build_plan(WorkloadSpec(num_adapters=8, alpha=0.2, num_requests=50, seed=1))
    assert [(r.at, r.prompt, r.max_tokens) for r in a] == [(r.at, r.prompt, r.max_tokens) for r in b]


def test_alpha_one_is_roughly_uniform():
    idx = adapter_indices(WorkloadSpec(num_adapters=10, alpha=1.0), N, np.random.default_rng(0))
    counts = np.bincount(idx, minlength=10)
    assert idx.min() >= 0 and idx.max() <= 9
    assert counts.min() > 0.08 * N and counts.max() < 0.12 * N  # 0.1 each


def test_small_alpha_is_skewed_toward_low_indices():
    idx = adapter_indices(WorkloadSpec(num_adapters=10, alpha=0.3), N, np.random.default_rng(0))
    counts = np.bincount(idx, minlength=10)
    assert 0.45 * N < counts[0] < 0.55 * N  # P(X < 0.1) = 0.1 ** 0.3 = 0.50
    assert counts[0] > counts[1] > counts[9]
    assert counts[:5].sum() > 0.75 * N  # 0.5 ** 0.3 = 0.81


def test_zipf_is_skewed_and_bounded():
    idx = adapter_indices(WorkloadSpec(num_adapters=10, popularity="zipf", zipf_s=1.0), N, np.random.default_rng(0))
    counts = np.bincount(idx, minlength=10)
    assert idx.max() <= 9
    assert 0.30 * N < counts[0] < 0.38 * N  # 1 / H(10) = 0.341
    assert counts[0] > 1.7 * counts[1]


@pytest.mark.parametrize("cv", [1.0, 2.0])
def test_gamma_arrivals_have_the_rate_and_cv(cv):
    gaps = np.diff(arrival_times(4.0, cv, N, np.random.default_rng(0)))
    assert gaps.mean() == pytest.approx(0.25, rel=0.05)
    assert gaps.std() == pytest.approx(cv * gaps.mean(), rel=0.12)


def test_infinite_rate_sends_everything_at_once():
    plan = build_plan(WorkloadSpec(num_adapters=2, rate=math.inf, num_requests=10))
    assert [r.at for r in plan] == [0.0] * 10


def test_base_share_is_respected_and_cold_marks_first_use():
    plan = build_plan(WorkloadSpec(num_adapters=4, base_share=0.3, num_requests=N, prompt_len=(1, 1), seed=2))
    share = sum(r.adapter is None for r in plan) / N
    assert 0.28 < share < 0.32
    cold = [r.adapter for r in plan if r.cold]
    assert sorted(cold) == ["lora-0", "lora-1", "lora-2", "lora-3"]
    assert all(r.adapter is not None for r in plan if r.cold)


def test_duration_bounds_the_plan():
    plan = build_plan(WorkloadSpec(num_adapters=2, rate=10, num_requests=None, duration=30, seed=1))
    assert all(r.at < 30 for r in plan)
    assert 240 < len(plan) < 360
    both = build_plan(WorkloadSpec(num_adapters=2, rate=10, num_requests=50, duration=30, seed=1))
    assert len(both) == 50


def test_lengths_from_ranges_and_from_a_file(tmp_path):
    plan = build_plan(WorkloadSpec(num_adapters=2, num_requests=200, prompt_len=(3, 5), output_len=(7, 9)))
    assert {len(r.prompt.split()) for r in plan} == {3, 4, 5}
    assert {r.max_tokens for r in plan} == {7, 8, 9}
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hi", "max_tokens": 3}\n\n{"prompt": "yo", "max_tokens": 5}\n')
    plan = build_plan(WorkloadSpec(num_adapters=2, num_requests=50, prompts=load_prompts(path)))
    assert {(r.prompt, r.max_tokens) for r in plan} == {("hi", 3), ("yo", 5)}
    path.write_text('{"prompt": "hi"}\n')
    with pytest.raises(ValueError, match=r"prompts\.jsonl:1"):
        load_prompts(path)


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="bound"):
        WorkloadSpec(num_requests=None, duration=None)
    with pytest.raises(ValueError, match="base_share"):
        WorkloadSpec(num_adapters=0)
    with pytest.raises(ValueError, match="popularity"):
        WorkloadSpec(popularity="pareto")


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "ftp://127.0.0.1"])
def test_non_loopback_urls_are_refused(url):
    with pytest.raises(ValueError):
        check_loopback(url)


def test_loopback_urls_are_accepted():
    for url in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:80", "http://127.1.2.3"):
        check_loopback(url)


# ---- a smoke run against a real server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("loadgen")
    model_dir, base, _ = save_tiny_model(root / "tiny-llama")
    store = root / "store"
    store.mkdir()
    for i in range(3):
        make_adapter(base, AdapterSpec(f"lora-{i}", 4 * (i + 1), 8, ("q_proj", "v_proj")), store, seed=i + 1)
    args = ["--model", str(model_dir), "--adapters-dir", str(store), "--max-lora-rank", "16", "--max-loras", "4"]
    args += ["--kv-cache-tokens", "4096"]
    with running_server(args, root / "server.log") as url:
        yield url


def test_smoke_run_writes_a_full_report_and_plots(server, tmp_path):
    out = tmp_path / "run"
    argv = ["--url", server, "--out", str(out), "--adapters", "3", "--rate", "40", "--requests", "20"]
    argv += ["--duration", "20", "--alpha", "0.5", "--base-share", "0.3", "--prompt-len", "3:6"]
    argv += ["--output-len", "4:8", "--seed", "1", "--drain-timeout", "30"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    for key in VLLM_KEYS:
        assert key in report, key
    assert report["completed"] == 20 and report["failed"] == 0, report["errors"]
    assert report["machine"]["cpu"] and report["machine"]["isa"] == cpu_isa()  # figures name their CPU and ISA
    assert report["p99_ttft_ms"] > 0 and report["output_throughput"] > 0
    assert set(report["by_adapter_kind"]) == {"base", "adapter"}
    assert set(report["by_adapter_cache"]) == {"cold", "warm"}
    for split in [*report["by_adapter_kind"].values(), *report["by_adapter_cache"].values()]:
        assert set(VLLM_KEYS) <= set(split)
    kinds = report["by_adapter_kind"]
    assert kinds["base"]["completed"] + kinds["adapter"]["completed"] == 20
    rows = report["requests"]
    assert sum(r["output_tokens"] for r in rows) == report["total_output_tokens"]
    assert all(4 <= r["output_tokens"] <= 8 for r in rows)  # ignore_eos: exactly max_tokens each
    png = (out / "latency_cdfs.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_smoke_rate_sweep_plots(server, tmp_path):
    out = tmp_path / "sweep"
    argv = ["--url", server, "--out", str(out), "--adapters", "2", "--requests", "6", "--sweep-rates", "20,60"]
    argv += ["--prompt-len", "2:3", "--output-len", "3:4", "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((out / "report.json").read_text())
    assert summary["machine"]["isa"] == cpu_isa()
    assert summary["sweep"] == "rate" and [r["workload"]["rate"] for r in summary["runs"]] == [20, 60]
    for path in (out / "sweep_rate.png", out / "rate_20" / "latency_cdfs.png", out / "rate_60" / "report.json"):
        assert path.stat().st_size > 0
    assert (out / "sweep_rate.png").read_bytes().startswith(b"\x89PNG")


def test_missing_adapters_are_named(server, tmp_path, caplog):
    assert main(["--url", server, "--out", str(tmp_path), "--adapters", "5", "--requests", "1"]) == 2
    assert "lora-3, lora-4" in caplog.text
