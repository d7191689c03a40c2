"""loadtests/bench/gpu_lora.py: refuses to run without CUDA, and its popularity plans are what they claim."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from loadtests.bench.gpu_lora import main, token_slots


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmark runs")
def test_it_refuses_to_run_without_cuda(capsys, tmp_path):
    assert main(["--out", str(tmp_path / "out.json")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_popularity_plans():
    assert token_slots("identical", 64, 32) == [0] * 64
    assert token_slots("distinct", 8, 4) == [0, 1, 2, 3, 0, 1, 2, 3]
    zipf = Counter(token_slots("zipf", 4096, 64, seed=1))
    assert set(zipf) <= set(range(64)) and zipf[0] > 3 * zipf[3] > 0  # skewed towards the first adapters
    assert token_slots("zipf", 1, 1) == [0]
    with pytest.raises(ValueError, match="unknown popularity"):
        token_slots("uniform", 4, 4)
