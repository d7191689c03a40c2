"""The load-test baselines as real processes on a tiny model: every output equals transformers + PEFT alone.

Each baseline (``loadtests/baselines``) is started on a tiny llama and a store of two
adapters, then sent concurrent greedy requests (base and both adapters, streaming and
not, prompts of different lengths so batches are left-padded, with and without
``ignore_eos`` on prompts whose greedy output reaches EOS). Each answer's text, finish
reason and token count must be the reference's; each stream must end with a usage
chunk, then ``data: [DONE]``.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers.reference import greedy, peft_model
from tests.helpers.server_process import free_port, stop, wait_until_up
from tests.helpers.tiny import AdapterSpec, make_adapter
from tests.helpers.tiny_server import save_tiny_model

ROOT = Path(__file__).resolve().parents[2]
EOS = 0
ADAPTERS = (
    AdapterSpec("alpha", 4, 8, ("q_proj", "v_proj", "down_proj")),
    AdapterSpec("beta", 8, 16, ("q_proj", "k_proj", "o_proj", "gate_proj", "up_proj")),
)
# Greedy reaches EOS early on some of these: base "fox the", alpha "quick dog", beta "the hello".
PROMPTS = ("the quick brown fox", "fox the", "quick dog", "the hello", "a multi adapter lora server batches many")
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    model_dir, model, tok = save_tiny_model(root / "tiny-llama")
    store = root / "store"
    for i, spec in enumerate(ADAPTERS):
        make_adapter(model, spec, store, seed=10 + i)
    refs = {"": model, "tiny-llama": model} | {s.name: peft_model(model, store / s.name) for s in ADAPTERS}
    reference = {}  # (model field, prompt, ignore_eos) -> (text, finish_reason, completion_tokens)
    for name, prompt, ignore_eos in itertools.product(refs, PROMPTS, (False, True)):
        ids = greedy(refs[name], tok(prompt)["input_ids"], MAX_TOKENS, None if ignore_eos else EOS)
        reason = "stop" if ids[-1] == EOS and not ignore_eos else "length"
        reference[name, prompt, ignore_eos] = (tok.decode(ids, skip_special_tokens=True), reason, len(ids))
    # Agreement means something only if the adapters change the output and EOS both stops and, ignored, does not.
    assert len({reference[name, PROMPTS[0], False][0] for name in refs}) == 3
    stopped = {(name, prompt) for (name, prompt, _), r in reference.items() if r[1] == "stop"}
    assert {name for name, _ in stopped} >= {"", "alpha", "beta"}, stopped
    assert all(reference[name, prompt, True][2] == MAX_TOKENS for name, prompt in stopped)
    cases = [(*key, i % 2 == 0) for i, key in enumerate(reference)]  # (model field, prompt, ignore_eos, stream)
    expected = {case: reference[case[:3]] for case in cases}
    return model_dir, store, cases, expected


def _complete(base: str, case: tuple) -> tuple[str, str, int]:
    """(text, finish_reason, completion_tokens) of one request."""
    name, prompt, ignore_eos, stream = case
    body = {"model": name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": ignore_eos}
    if not stream:
        r = httpx.post(base + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model"] == (name or "tiny-llama")
        return out["choices"][0]["text"], out["choices"][0]["finish_reason"], out["usage"]["completion_tokens"]
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        frames = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]", frames
    chunks = [json.loads(f) for f in frames[:-1]]
    usage, last, texts = chunks[-1], chunks[-2], chunks[:-1]
    assert usage["choices"] == [] and all(c["choices"][0]["finish_reason"] is None for c in texts[:-1])
    text = "".join(c["choices"][0]["text"] for c in texts)
    return text, last["choices"][0]["finish_reason"], usage["usage"]["completion_tokens"]


@pytest.mark.parametrize("baseline", ["peft_swap", "peft_mixed", "merged"])
def test_baseline_serves_the_reference_outputs(baseline, setup, tmp_path):
    model_dir, store, cases, expected = setup
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / f"{baseline}.log"
    cmd = [sys.executable, "-m", f"loadtests.baselines.{baseline}", "--model", str(model_dir),
           "--adapters-dir", str(store), "--port", str(port), "--max-batch", "4"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_up(proc, base + "/health", log, 60.0)
        models = [m["id"] for m in httpx.get(base + "/v1/models").json()["data"]]
        assert models == ["tiny-llama", "alpha", "beta"]
        r = httpx.post(base + "/v1/completions", json={"model": "nope", "prompt": "hi", "temperature": 0})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            results = list(pool.map(lambda c: _complete(base, c), cases))
        for case, got in zip(cases, results, strict=True):
            assert got == expected[case], case
    finally:
        stop(proc, 20)


def test_merged_refuses_too_many_adapters(setup, tmp_path):
    model_dir, store, _, _ = setup
    cmd = [sys.executable, "-m", "loadtests.baselines.merged", "--model", str(model_dir),
           "--adapters-dir", str(store), "--port", str(free_port()), "--max-adapters", "1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "holds 2 adapters but --max-adapters is 1" in done.stderr
