"""Drive an engine directly (no HTTP): build it on an in-memory model, submit requests, collect outputs."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from server.adapters.selection import Selection, Term
from server.config import (
    AdminConfig,
    AuthConfig,
    CacheConfig,
    Config,
    HttpConfig,
    LimitsConfig,
    LoraConfig,
    ModelConfig,
)
from server.engine.builder import Serving, build_serving_in_fresh_thread
from server.engine.messages import RequestOutput
from server.engine.request import Request, SamplingParams
from server.engine.scheduler import SchedulerConfig
from server.metrics import MetricsConfig
from server.model.loading import LoadedModel


def build(
    hf_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    adapters_dir: Path,
    cache_dir: Path,
    backend: str = "auto",
    max_loras: int = 8,
    max_rank: int = 16,
    kv_tokens: int = 4096,
    block_size: int = 16,
    prefix_caching: bool = True,
    max_model_len: int = 0,
    max_num_batched_tokens: int = 512,
    max_num_seqs: int = 64,
    host_cache_bytes: int = 1 << 30,
    adapter_wait_timeout: float = 30.0,
    admin: AdminConfig | None = None,
    http: HttpConfig | None = None,
    limits: LimitsConfig | None = None,
    auth: AuthConfig | None = None,
    metrics: MetricsConfig | None = None,
    store_url: str = "",
    s3_endpoint_url: str | None = None,
) -> Serving:
    config = Config(
        model=ModelConfig(cache_dir=cache_dir),
        lora=LoraConfig(
            adapters_dir=adapters_dir,
            max_lora_rank=max_rank,
            max_loras=max_loras,
            backend=backend,
            host_cache_bytes=host_cache_bytes,
            store_url=store_url,
            s3_endpoint_url=s3_endpoint_url,
        ),
        cache=CacheConfig(kv_cache_tokens=kv_tokens, block_size=block_size, prefix_caching=prefix_caching),
        scheduler=SchedulerConfig(
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            adapter_wait_timeout=adapter_wait_timeout,
        ),
        http=http or HttpConfig(),
        admin=admin or AdminConfig(),
        auth=auth or AuthConfig(),
        limits=limits or LimitsConfig(),
        metrics=metrics or MetricsConfig(),
    )
    loaded = LoadedModel(hf_model=hf_model, tokenizer=tokenizer, name="tiny", source=adapters_dir)
    return build_serving_in_fresh_thread(config, loaded)


@dataclass
class Collected:
    """An engine output sink that keeps every output and when it arrived (``time.perf_counter``)."""

    outputs: list[RequestOutput] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def __call__(self, out: RequestOutput) -> None:
        self.times.append(time.perf_counter())
        self.outputs.append(out)
        if out.finished:
            self.done.set()

    @property
    def error(self) -> str | None:
        return self.outputs[-1].error if self.outputs else None

    @property
    def token_ids(self) -> list[int]:
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outputs)

    @property
    def last(self) -> RequestOutput:
        return self.outputs[-1]


def submit(serving: Serving, request_id: str, prompt_ids: list[int], adapter: str | None, params: SamplingParams):
    return submit_selection(serving, request_id, prompt_ids, ((adapter, 1.0),) if adapter else (), params)


def submit_selection(
    serving: Serving,
    request_id: str,
    prompt_ids: list[int],
    terms: tuple[tuple[str, float], ...],
    params: SamplingParams,
) -> Collected:
    """Submit a request of the weighted sum of stored adapters ``terms`` ((name, weight) pairs; () = base)."""
    selection = selection_of(serving, terms)
    sink = Collected()
    serving.engine.submit(Request(request_id, prompt_ids, params, selection=selection), sink)
    return sink


def selection_of(serving: Serving, terms: tuple[tuple[str, float], ...] | str | None) -> Selection:
    """The selection of stored adapters ``terms`` ((name, weight) pairs), of one adapter by name, or of the base
    model (None or ())."""
    if isinstance(terms, str):
        terms = ((terms, 1.0),)
    return Selection(tuple(Term(serving.store.get(name), weight) for name, weight in terms or ()))
