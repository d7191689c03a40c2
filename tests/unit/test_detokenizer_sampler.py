"""Incremental detokenization with stop strings, and per-request sampling."""

from __future__ import annotations

import pytest
import torch

from server.engine.detokenizer import Detokenizer
from server.engine.request import Request, SamplingParams
from server.engine.sampler import Sampler
from tests.helpers.tiny import make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _stream(tok, text: str, stop=(), keep_stop=False):
    ids = tok(text)["input_ids"]
    d = Detokenizer(tok, tok("hello")["input_ids"], tuple(stop), keep_stop)
    pieces = []
    for t in ids:
        d.push(t)
        pieces.append(d.delta(final=False))
        if d.stopped:
            break
    pieces.append(d.delta(final=True))
    return pieces, d


def test_deltas_concatenate_to_the_decoded_text(tok):
    text = "the quick brown fox jumps over the lazy dog"
    pieces, d = _stream(tok, text)
    assert "".join(pieces) == text == d.text
    assert not d.stopped


def test_stop_string_is_cut_and_never_streamed(tok):
    pieces, d = _stream(tok, "the quick brown fox jumps over", stop=["fox"])
    assert d.stopped
    assert "".join(pieces) == "the quick brown "
    assert all("fox" not in p and not p.endswith("fo") for p in pieces)


def test_a_kept_stop_string_ends_the_text(tok):
    pieces, d = _stream(tok, "the quick brown fox jumps over", stop=["jumps", "fox"], keep_stop=True)
    assert d.stopped and "".join(pieces) == "the quick brown fox"


def test_partial_stop_prefix_is_released_when_it_is_not_a_stop(tok):
    pieces, d = _stream(tok, "the quick brown fox", stop=["quick red"])
    assert not d.stopped
    assert "".join(pieces) == "the quick brown fox"


def test_sampling_params_are_validated():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=("",))
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**70)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=-1)


def _reqs(*rows: tuple[str, SamplingParams]) -> list[Request]:
    return [Request(request_id=rid, prompt_ids=[1], params=p) for rid, p in rows]


def _sample(sampler: Sampler, logits: torch.Tensor, *rows: tuple[str, SamplingParams]) -> list[int]:
    return sampler.sample(logits, _reqs(*rows)).tokens


def test_tiny_temperatures_sample_greedily_instead_of_overflowing():
    logits = torch.randn(2, 50) * 30
    params = SamplingParams(temperature=1e-30, seed=1)
    assert params.greedy
    assert _sample(Sampler(torch.device("cpu")), logits, ("t", params), ("u", params)) == logits.argmax(-1).tolist()


def test_greedy_rows_take_the_argmax_and_seeds_repeat():
    logits = torch.randn(3, 50)
    s = Sampler(torch.device("cpu"))
    greedy = SamplingParams(temperature=0.0)
    seeded = SamplingParams(temperature=1.0, seed=7)
    out = _sample(s, logits, ("a", greedy), ("b", seeded), ("c", greedy))
    assert out[0] == int(logits[0].argmax()) and out[2] == int(logits[2].argmax())
    again = _sample(Sampler(torch.device("cpu")), logits, ("a", greedy), ("b", seeded), ("c", greedy))
    assert again == out


def test_a_seeded_draw_does_not_depend_on_the_rest_of_the_batch():
    logits = torch.randn(4, 64)
    seeded = SamplingParams(temperature=1.0, seed=11)
    alone = [_sample(s, logits[1:2], ("x", seeded))[0] for s in [Sampler(torch.device("cpu"))] for _ in range(5)]
    s = Sampler(torch.device("cpu"))
    mixed = [_sample(s, logits, ("a", SamplingParams(temperature=0.7)), ("x", seeded),
                     ("b", SamplingParams(top_k=3, seed=2)), ("c", SamplingParams(temperature=0)))[1]
             for _ in range(5)]
    assert mixed == alone


def test_the_draw_follows_the_distribution():
    """The exponential race picks each token with its softmax probability (a loose chi-square bound)."""
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    probs = torch.softmax(logits[0], -1)
    s = Sampler(torch.device("cpu"))
    n = 4000
    batch = logits.expand(n, 4).contiguous()
    drawn = s.sample(batch, _reqs(*[(f"r{i}", SamplingParams()) for i in range(n)])).tokens
    counts = torch.bincount(torch.tensor(drawn), minlength=4).float()
    chi2 = float((((counts - n * probs) ** 2) / (n * probs)).sum())
    assert chi2 < 16.3, (counts, probs)  # p = 0.001 for 3 degrees of freedom


def test_top_k_and_top_p_restrict_the_draw():
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0, -10.0]])
    s = Sampler(torch.device("cpu"))
    drawn = {_sample(s, logits, (f"k{i}", SamplingParams(top_k=2, seed=i)))[0] for i in range(40)}
    assert drawn <= {0, 1} and len(drawn) == 2
    drawn = {_sample(s, logits, (f"p{i}", SamplingParams(top_p=0.5, seed=i)))[0] for i in range(20)}
    assert drawn == {0}
    drawn = {_sample(s, logits, (f"m{i}", SamplingParams(min_p=0.3, seed=i)))[0] for i in range(40)}
    assert drawn == {0, 1}  # p(2) / p(0) = e^-2 < 0.3 <= p(1) / p(0)
