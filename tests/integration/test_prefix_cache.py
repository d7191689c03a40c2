"""Prefix caching and KV on demand against transformers + PEFT on a tiny Llama.

Shared prompt prefixes across the same adapter, other adapters, a composition
and the base model; an adapter re-uploaded under its name between two equal
prompts; a KV cache far too small for the load (preemptions). Every answer must
equal the reference no one here wrote, with the cache on and off, and the
cached token counts must show what was shared and, above all, what was not.
"""

from __future__ import annotations

import shutil

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.engine.request import SamplingParams
from tests.helpers import engine as eng
from tests.helpers.reference import greedy, merged_model
from tests.helpers.tiny import MIXED_ADAPTERS, make_adapter, make_model, make_tokenizer
from tests.helpers.uploads import files_of

pytestmark = pytest.mark.usefixtures("c_kernels")

BLOCK = 16
MAX_NEW = 8
SYSTEM = (
    "you are a careful assistant of a multi adapter lora server. answer briefly, in plain words, and never make up "
    "numbers 0 1 2 3 4 5 6 7 8 9; the quick brown fox jumps over the lazy dog. "
)
QUESTIONS = ("hello world, what is lora?", "which adapter am i talking to?")
SPECS = {"a": MIXED_ADAPTERS[0], "b": MIXED_ADAPTERS[2], "a-next": MIXED_ADAPTERS[0]}
COMPOSED = (("a", 0.6), ("b", -0.8))
SELECTIONS = [None, "a", "b", COMPOSED]  # base, two adapters, a weighted sum of both


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tok = make_tokenizer()
    base = make_model("llama", len(tok), seed=5)
    made = tmp_path_factory.mktemp("made")
    folders = {name: make_adapter(base, spec, made / name, seed=60 + i) for i, (name, spec) in
               enumerate(SPECS.items())}
    store = tmp_path_factory.mktemp("store")
    for name in ("a", "b"):
        shutil.copytree(folders[name], store / name)
    references: dict[tuple, list[int]] = {}

    def expected(terms: tuple[tuple[str, float], ...], ids: list[int], n: int = MAX_NEW, eos: int | None = 0):
        key = (terms, tuple(ids), n, eos)
        if key not in references:
            model = merged_model(base, [(folders[name], w) for name, w in terms])
            references[key] = greedy(model, ids, n, eos_token_id=eos)
        return references[key]

    return tok, base, store, folders, expected


def terms_of(selection) -> tuple[tuple[str, float], ...]:
    if selection is None:
        return ()
    return ((selection, 1.0),) if isinstance(selection, str) else selection


def complete(client: TestClient, selection, prompt: str) -> dict:
    body = {"model": "", "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0}
    if isinstance(selection, str):
        body["model"] = selection
    elif selection is not None:
        body["adapters"] = [{"name": n, "weight": w} for n, w in selection]
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def shared_blocks(first: list[int], second: list[int]) -> int:
    """Tokens of ``second`` the cache can serve after ``first`` ran: their common full blocks, short of
    ``second``'s last token."""
    common = 0
    while common < min(len(first), len(second)) and first[common] == second[common]:
        common += 1
    return min(common, len(second) - 1) // BLOCK * BLOCK


@pytest.mark.parametrize("caching", [True, False], ids=["cache-on", "cache-off"])
def test_shared_prefixes_are_reused_only_by_the_weights_that_computed_them(world, tmp_path, caching):
    tok, base, store, _, expected = world
    app = create_app(lambda: eng.build(base, tok, store, tmp_path, kv_tokens=2048, prefix_caching=caching))
    prompts = [SYSTEM + q for q in QUESTIONS]
    ids = [tok(p)["input_ids"] for p in prompts]
    assert shared_blocks(ids[0], ids[1]) >= 4 * BLOCK  # the system prompt spans several full blocks
    with TestClient(app) as client:
        seen: dict[tuple, dict] = {}
        for selection in SELECTIONS:  # one selection after another: each finds the prefix the others computed
            for i, prompt in enumerate(prompts + prompts[:1]):  # the first question asked twice
                body = complete(client, selection, prompt)
                prompt_ids = ids[i % 2]
                want = expected(terms_of(selection), prompt_ids)
                assert body["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True), (selection, i)
                seen[(str(selection), i)] = body["usage"]
        sched = client.app.state.loraplex.serving.engine.scheduler
        assert sched.blocks.used_blocks == 0 and not sched.has_work
    for selection in SELECTIONS:
        cached = [seen[(str(selection), i)]["prompt_tokens_details"]["cached_tokens"] for i in range(3)]
        if caching:  # never what another selection computed; the second question shares the system prompt
            assert cached == [0, shared_blocks(ids[0], ids[1]), (len(ids[0]) - 1) // BLOCK * BLOCK], selection
        else:
            assert cached == [0, 0, 0], selection


def test_a_reupload_under_the_same_name_never_reuses_the_old_versions_blocks(world, tmp_path):
    tok, base, store, folders, expected = world
    own = tmp_path / "store"
    shutil.copytree(store, own)
    app = create_app(lambda: eng.build(base, tok, own, tmp_path / "cache", kv_tokens=2048))
    prompt = SYSTEM + QUESTIONS[0]
    ids = tok(prompt)["input_ids"]
    full = (len(ids) - 1) // BLOCK * BLOCK
    old, new = expected((("a", 1.0),), ids), expected((("a-next", 1.0),), ids)
    assert old != new  # the new version answers otherwise: reusing old blocks would show

    def upload(folder) -> None:
        r = client.post("/admin/adapters", data={"name": "a"}, files=files_of(folder))
        assert r.status_code in (200, 201), r.text

    with TestClient(app) as client:
        for _ in range(2):
            body = complete(client, "a", prompt)
            assert body["choices"][0]["text"] == tok.decode(old, skip_special_tokens=True)
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == full
        upload(folders["a-next"])
        for cached in (0, full):  # the new version computes its own blocks, then reuses them
            body = complete(client, "a", prompt)
            assert body["choices"][0]["text"] == tok.decode(new, skip_special_tokens=True)
            assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
        upload(folders["a"])  # the first content again: its digest's blocks are those weights' blocks
        body = complete(client, "a", prompt)
        assert body["choices"][0]["text"] == tok.decode(old, skip_special_tokens=True)


@pytest.mark.parametrize("caching", [True, False], ids=["cache-on", "cache-off"])
def test_a_kv_cache_too_small_for_the_load_preempts_and_every_answer_is_still_right(world, tmp_path, caching):
    tok, base, store, _, expected = world
    # 12 blocks of 16 tokens; each request grows to 2 prompt + 3 output blocks: about two fit at once
    serving = eng.build(base, tok, store, tmp_path, kv_tokens=12 * BLOCK, max_model_len=12 * BLOCK,
                        prefix_caching=caching)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    plan = [(SELECTIONS[i % 4], f"question {i}: " + SYSTEM[: 40 + 3 * i]) for i in range(8)]
    serving.engine.start()
    try:
        sinks = []
        for i, (selection, prompt) in enumerate(plan):
            ids = tok(prompt)["input_ids"]
            sinks.append((eng.submit_selection(serving, f"r{i}", ids, terms_of(selection), params), ids))
        for sink, _ in sinks:
            assert sink.done.wait(120), "a request did not finish"
        sched = serving.engine.scheduler
        idle = serving.engine.call(lambda: (sched.has_work, sched.blocks.used_blocks, dict(sched.busy_slots())))
        assert idle.result(10) == (False, 0, {})
    finally:
        serving.stop()
    for (sink, ids), (selection, _) in zip(sinks, plan, strict=True):
        assert sink.last.error is None, sink.last.error
        assert sink.token_ids == expected(terms_of(selection), ids, 40, None), selection
    preemptions = serving.metrics.registry.get_sample_value("loraplex_preemptions_total")
    assert preemptions and preemptions > 0


def test_longrope_blocks_are_keyed_by_the_rope_table_that_computed_them(tmp_path):
    """Phi-4-mini's longrope switches tables past 8 positions here: a sequence computed under the short table
    is computed again under the long one, and blocks of one table are never found by the other."""
    tok = make_tokenizer()
    base = make_model("phi4mini", len(tok), seed=9)
    serving = eng.build(base, tok, tmp_path / "store", tmp_path, kv_tokens=1024, block_size=4)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    longer = tok("the quick brown fox jumps over the lazy dog")["input_ids"]
    short = longer[:8]  # the short table until it grows past 8 tokens
    serving.engine.start()
    try:
        outputs = []
        for i, ids in enumerate([short, short, longer, longer, short]):
            sink = eng.submit(serving, f"r{i}", ids, None, params)
            assert sink.done.wait(60)
            outputs.append((ids, sink))
    finally:
        serving.stop()
    for ids, sink in outputs:
        assert sink.last.error is None
        assert sink.token_ids == greedy(base, ids, 10, eos_token_id=None)
    # r1: the first short block (r0's, short table). r2: r0's first 8 tokens computed again past 8 tokens
    # (long table). r3: all but its last token's block; r4 as r1.
    assert [sink.last.cached_tokens for _, sink in outputs] == [0, 4, 8, 20, 4]
