"""The run's summary, with the key names of vLLM's serving benchmark, overall and split.

Top-level keys are vLLM's (``completed``, ``failed``, ``duration``, ``request_throughput``, ``output_throughput``,
``total_token_throughput``, ``{mean,median,p90,p99}_{ttft,tpot,itl,e2el}_ms``), so a vLLM report and ours read the
same way. ``by_adapter_kind`` splits them into ``base`` and ``adapter`` requests; ``by_adapter_cache`` splits the
adapter requests into ``cold`` (the run's first request for that adapter) and ``warm``. A split's throughputs are
its share of the whole run's (its tokens over the run's duration). Latency statistics cover completed requests;
a statistic with no samples is null. ITL is the gap between text chunks as the client sees them (a chunk may
carry several tokens); TPOT is (e2el - ttft) / (output tokens - 1) per request, as vLLM defines both.
``requests`` holds one row per request, for plots and later analysis.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from loadtests.client import RequestRecord, RunResult

METRICS = ("ttft", "tpot", "itl", "e2el")
STATS = ("mean", "median", "p90", "p99")


def _stats(name: str, seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {f"{s}_{name}_ms": None for s in STATS}
    ms = np.asarray(seconds) * 1000.0
    values = (ms.mean(), np.median(ms), np.percentile(ms, 90), np.percentile(ms, 99))
    return {f"{s}_{name}_ms": round(float(v), 3) for s, v in zip(STATS, values, strict=True)}


def summarize(records: Iterable[RequestRecord], duration: float) -> dict[str, Any]:
    """vLLM's summary keys for ``records`` over a run of ``duration`` seconds."""
    records = list(records)
    done = [r for r in records if r.ok]
    input_tokens = sum(r.prompt_tokens or 0 for r in done)
    output_tokens = sum(r.output_tokens or 0 for r in done)
    out: dict[str, Any] = {
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration": round(duration, 3),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration if duration > 0 else None,
        "output_throughput": output_tokens / duration if duration > 0 else None,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration > 0 else None,
    }
    samples = {
        "ttft": [r.ttft for r in done if r.ttft is not None],
        "tpot": [t for t in (r.tpot for r in done) if t is not None],
        "itl": [gap for r in done for gap in r.itls],
        "e2el": [r.e2el for r in done if r.e2el is not None],
    }
    for name in METRICS:
        out.update(_stats(name, samples[name]))
    return out


def _row(r: RequestRecord) -> dict[str, Any]:
    def ms(x: float | None) -> float | None:
        return None if x is None else round(x * 1000.0, 3)

    return {
        "index": r.index,
        "adapter": r.adapter,
        "adapter_kind": r.adapter_kind,
        "cold": r.cold,
        "sent_s": None if r.sent is None else round(r.sent, 4),
        "ttft_ms": ms(r.ttft),
        "tpot_ms": ms(r.tpot),
        "e2el_ms": ms(r.e2el),
        "prompt_tokens": r.prompt_tokens,
        "output_tokens": r.output_tokens,
        "status": r.status,
        "error": r.error,
    }


def build_report(result: RunResult, workload: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole report: overall keys at the top, the splits, the workload that made it, per-request rows."""
    recs = result.records
    adapter_recs = [r for r in recs if r.adapter is not None]
    report = summarize(recs, result.duration)
    report["by_adapter_kind"] = {
        kind: summarize([r for r in recs if r.adapter_kind == kind], result.duration)
        for kind in ("base", "adapter")
        if any(r.adapter_kind == kind for r in recs)
    }
    report["by_adapter_cache"] = {
        state: summarize([r for r in adapter_recs if r.cold == (state == "cold")], result.duration)
        for state in ("cold", "warm")
        if any(r.cold == (state == "cold") for r in adapter_recs)
    }
    errors: dict[str, int] = {}
    for r in recs:
        if r.error is not None:
            key = r.error[:120]
            errors[key] = errors.get(key, 0) + 1
    report["errors"] = errors
    report["workload"] = workload or {}
    report["requests"] = [_row(r) for r in recs]
    return report
