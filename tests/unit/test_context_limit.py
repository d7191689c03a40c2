"""The context limit at start-up: --max-model-len, else the model's context; the KV cache must hold one request."""

from __future__ import annotations

import pytest

from server.config import CacheConfig, Config
from server.engine.builder import context_limit
from server.engine.scheduler import SchedulerConfig
from server.flag_errors import RefusedAtStartup


def config(kv_tokens: int, max_model_len: int = 0, block_size: int = 16) -> Config:
    return Config(cache=CacheConfig(kv_cache_tokens=kv_tokens, block_size=block_size),
                  scheduler=SchedulerConfig(max_model_len=max_model_len))


def test_the_models_context_when_the_cache_holds_it():
    assert context_limit(config(32768), 8192) == 8192
    assert context_limit(config(8192), 8192) == 8192


def test_a_cache_smaller_than_the_models_context_is_refused_naming_both_flags():
    with pytest.raises(RefusedAtStartup) as refused:
        context_limit(config(4096), 8192)
    message = str(refused.value)
    assert "--kv-cache-tokens 4096 is too small for one request of the model's context (8192 tokens)" in message
    assert "--max-model-len" in message


def test_a_lower_max_model_len_lets_a_small_cache_start():
    assert context_limit(config(4096, max_model_len=4096), 8192) == 4096
    with pytest.raises(ValueError, match="too small for one request of --max-model-len"):
        context_limit(config(4096, max_model_len=5000), 8192)


def test_max_model_len_past_the_models_context_is_refused():
    with pytest.raises(ValueError, match="--max-model-len 9000 exceeds the model's context"):
        context_limit(config(32768, max_model_len=9000), 8192)


def test_the_cache_counts_whole_blocks():
    with pytest.raises(ValueError, match="too small"):  # 8200 tokens are 512 blocks of 16: 8192 positions
        context_limit(config(8200, max_model_len=8193), 8192 * 2)
