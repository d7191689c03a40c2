"""The load-test suite's bookkeeping: goals from reports, the summary tables, and stores shared by hard links."""

from __future__ import annotations

import json
import os

import pytest

from loadtests.stores import make_store, planned_ranks
from loadtests.suite import ADAPTER_SERIES, goals, summary_markdown


def report(out_tps: float, adapters: int = 64, rate="inf", **extra) -> dict:
    row = {
        "request_throughput": out_tps / 32,
        "output_throughput": out_tps,
        "median_ttft_ms": 100.0,
        "p99_ttft_ms": 400.0,
        "median_tpot_ms": 20.0,
        "p99_tpot_ms": 40.0,
        "completed": 10,
        "failed": 0,
        "workload": {"num_adapters": adapters, "rate": rate},
    }
    return row | extra


def parts(swap: float, mixed: float, a512: float, p99_adapter: float) -> dict:
    skewed, uniform, qv = ADAPTER_SERIES
    kinds = {"base": {"p99_ttft_ms": 1000.0}, "adapter": {"p99_ttft_ms": p99_adapter}}
    return {
        "peers": {"systems": {"loraplex": report(400.0), "peft_swap": report(swap), "peft_mixed": report(mixed)}},
        "adapters": {
            "series": {
                skewed: [report(300.0, 8), report(a512, 512)],
                uniform: [report(300.0, 8), report(150.0, 512)],  # not the goal's series
                qv: [report(300.0, 8), report(290.0, 512)],
            }
        },
        "rates": {
            "runs": [
                report(300.0, rate=5.0, saturation_fraction=1.0, by_adapter_kind={"adapter": {"p99_ttft_ms": 9e9}}),
                report(200.0, rate=3.5, saturation_fraction=0.7, by_adapter_kind=kinds),
            ]
        },
    }


def test_goals_are_computed_from_the_right_runs_and_compared_the_right_way():
    met = {g["goal"]: g for g in goals(parts(swap=100.0, mixed=200.0, a512=255.0, p99_adapter=1300.0))}
    values = [(g["value"], g["met"]) for g in met.values()]
    # each exactly at its bound; the in-memory adapter sweep was not run
    assert values == [(4.0, True), (2.0, True), (0.85, True), (None, None), (1.3, True)]

    missed = goals(parts(swap=101.0, mixed=201.0, a512=254.0, p99_adapter=1301.0))
    assert [g["met"] for g in missed] == [False, False, False, None, False]
    assert [g["value"] for g in missed] == [3.96, 1.99, 0.847, None, 1.301]


def test_goals_of_parts_not_run_are_unknown_not_met():
    rows = goals({})
    assert len(rows) == 5 and all(g["value"] is None and g["met"] is None for g in rows)


def test_summary_tables_carry_the_figures():
    text = summary_markdown(parts(swap=100.0, mixed=200.0, a512=255.0, p99_adapter=1300.0), goals({}))
    assert "| loraplex | 12.50 | 400.00 |" in text
    assert "| skewed (alpha 0.3) | 512 | 255.0 | 400 | 0.85 |" in text
    assert "| 3.5 | 0.7 | 200.0 | 1000.0 | 1300.0 | 1.3 |" in text


def _fake_store(root, count: int, rank: int = 16) -> None:
    for name in planned_ranks(count, "lora-", [rank]):
        (root / name).mkdir(parents=True)
        (root / name / "adapter_config.json").write_text(json.dumps({"r": rank}))
        (root / name / "adapter_model.safetensors").write_bytes(name.encode())


def test_a_smaller_store_is_hard_links_into_a_larger_one(tmp_path):
    source = tmp_path / "big"
    _fake_store(source, 5)
    small = make_store(tmp_path / "small", 3, "lora-", 0, source=source)
    assert sorted(p.name for p in small.iterdir()) == ["lora-0", "lora-1", "lora-2"]
    linked = small / "lora-2" / "adapter_model.safetensors"
    assert os.path.samefile(linked, source / "lora-2" / "adapter_model.safetensors")
    assert linked.read_bytes() == b"lora-2"
    assert make_store(tmp_path / "small", 3, "lora-", 0, source=None) == small  # reused as it is: nothing made
    assert not (tmp_path / "small.tmp").exists()


def test_rank_plans_cycle_and_refuse_nonsense():
    assert list(planned_ranks(5, "a", [8, 16]).items()) == [("a0", 8), ("a1", 16), ("a2", 8), ("a3", 16), ("a4", 8)]
    for bad in ([], [0], [16, -1]):
        with pytest.raises(ValueError):
            planned_ranks(3, "a", bad)
