"""Assemble the serving stack from the configuration: model, runner, adapter cache, scheduler, engine."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import threading
import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from adapters_store.backend import AdapterStore
from adapters_store.base_model import BaseModelSpec
from adapters_store.local import LocalAdapterStore
from server import native
from server.adapters.loader import DiskLoader, store_reader
from server.adapters.residency import Residency
from server.config import Config, LoraConfig
from server.engine.block_manager import BlockManager
from server.engine.engine import Engine
from server.engine.grammar import Grammars
from server.engine.scheduler import Scheduler
from server.engine.telemetry import Telemetry
from server.flag_errors import RefusedAtStartup
from server.lora import cpu_kernel
from server.lora.metadata import LoraBackend
from server.metrics import Metrics
from server.model import cpu_attention
from server.model.architecture import ModelShape
from server.model.decoder import CausalLM
from server.model.loading import LoadedModel, load_model
from server.model.quantized_base import check_supported, quantized_weights
from server.model.runner import ModelRunner
from server.model.weights_source import QUANTIZED_CACHE

log = logging.getLogger(__name__)


@dataclass
class Serving:
    """What the HTTP side needs: the engine and the facts about the served model."""

    config: Config
    engine: Engine
    residency: Residency
    tokenizer: PreTrainedTokenizerBase
    store: AdapterStore
    spec: BaseModelSpec
    model_name: str
    max_model_len: int
    max_lora_rank: int
    created: int
    metrics: Metrics | None
    grammars: Grammars  # structured outputs' compiler for this tokenizer and vocabulary

    @property
    def vocab_size(self) -> int:
        """Token ids the model scores (its logits' width; may exceed the tokenizer's)."""
        return self.grammars.vocab_size

    def stop(self) -> None:
        """Stop the engine (aborting what still runs), then the adapter loader thread."""
        self.engine.stop()
        self.residency.close()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> LoraBackend:
    """The batched LoRA op for the whole run (every step and layer uses it): auto = our Triton kernels on
    CUDA, our C kernel on CPU, pure torch where neither can run."""
    if name == "auto":
        if device.type == "cuda":
            return LoraBackend.TRITON if triton_available() else LoraBackend.TORCH
        cpu_ok = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and cpu_kernel.available()
        return LoraBackend.CPU_KERNEL if cpu_ok else LoraBackend.TORCH
    backend = LoraBackend(name)
    if backend is LoraBackend.CPU_KERNEL and not (device.type == "cpu" and cpu_kernel.available()):
        raise ValueError("--lora-backend cpu needs a CPU device and a C compiler (gcc) to build the kernel")
    if backend is LoraBackend.TRITON:
        if not triton_available():
            raise ValueError("--lora-backend triton needs the triton package (installed with CUDA builds of torch)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("--lora-backend triton needs a CUDA device (or TRITON_INTERPRET=1, for tests)")
    return backend


def context_limit(config: Config, model_positions: int) -> int:
    """The tokens one request may hold: ``--max-model-len``, else the model's context. The KV cache must hold
    one such request, since blocks are shared by all requests and one may grow to the limit alone."""
    cache_tokens = config.cache.num_blocks * config.cache.block_size
    asked = config.scheduler.max_model_len
    if asked > model_positions:
        raise RefusedAtStartup(f"--max-model-len {asked} exceeds the model's context ({model_positions} tokens)")
    limit = asked or model_positions
    if limit > cache_tokens:
        what = "--max-model-len" if asked else "the model's context"
        raise RefusedAtStartup(
            f"--kv-cache-tokens {config.cache.kv_cache_tokens} is too small for one request of {what} "
            f"({limit} tokens): raise --kv-cache-tokens to at least {limit}, or set a lower --max-model-len"
        )
    return limit


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def base_model_spec(shape: ModelShape) -> BaseModelSpec:
    dims = shape.projection_dims()
    modules = {shape.module_name(i, p): dims[p] for i in range(shape.n_layers) for p in dims}
    return BaseModelSpec(
        architecture=shape.model_type,
        modules=modules,
        other_modules=frozenset({"model.embed_tokens", "lm_head"}),
    )


def eos_ids(loaded: LoadedModel) -> frozenset[int]:
    ids: set[int] = set()
    for source in (loaded.model_generation_config, loaded.model_config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update([value] if isinstance(value, int) else list(value or []))
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(loaded.tokenizer.eos_token_id)
    return frozenset(ids)


def open_store(lora: LoraConfig) -> AdapterStore:
    """The adapter store the flags name: a local folder, or an S3-compatible bucket cached in that folder."""
    if not lora.store_url:
        return LocalAdapterStore(lora.adapters_dir)
    from adapters_store.s3 import S3AdapterStore, s3_client

    return S3AdapterStore(
        lora.store_url, lora.adapters_dir, s3_client(lora.s3_endpoint_url), lora.store_refresh,
        cache_bytes=lora.store_cache_bytes,
    )


def build_serving_in_fresh_thread(config: Config, loaded: LoadedModel | None = None) -> Serving:
    """:func:`build_serving` on a short-lived thread, so the engine thread is the only one left running torch.

    A live thread that has run multi-threaded torch ops keeps an OpenMP team; with
    more OpenMP threads than cores, libgomp cuts its spin-wait to ~100 spins and
    every parallel op of the engine thread then waits for a sleeping worker
    (measured here: a decode step 1.4x slower). A thread's team dies with it.
    """
    box: list[Serving | BaseException] = []

    def work() -> None:
        try:
            box.append(build_serving(config, loaded))
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=work, name="loraplex-build")
    thread.start()
    thread.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def build_serving(config: Config, loaded: LoadedModel | None = None) -> Serving:
    """Load the model (unless given) and assemble an engine, not yet started."""
    started = time.monotonic()
    native.set_cache_dir(config.model.cache_dir / "kernels")
    device = resolve_device(config.model.device)
    dtype = resolve_dtype(config.model.dtype, device)
    # before the model's load, which takes seconds
    check_supported(config.model.quantization, device, dtype, config.model.activations)
    loaded = loaded or load_model(config.model.model, config.model.cache_dir, lean=True)
    max_len = context_limit(config, ModelShape.from_config(loaded.model_config).max_positions)  # before the weights
    tensors = loaded.tensors()
    quantized = quantized_weights(
        loaded.model_config, tensors, loaded.gguf, config.model.quantization, device, dtype,
        cache=loaded.source / QUANTIZED_CACHE if loaded.gguf else None,
        activations=config.model.activations,
    )
    model = CausalLM(loaded.model_config, tensors, device, dtype, quantized)
    shape = model.shape
    backend = resolve_backend(config.lora.backend, device, dtype)
    lora_dtype = dtype if config.lora.dtype == "auto" else getattr(torch, config.lora.dtype)
    if lora_dtype != dtype and not (
        backend is LoraBackend.CPU_KERNEL and dtype == torch.float32 and lora_dtype == torch.bfloat16
    ):
        raise ValueError(
            f"--lora-dtype {config.lora.dtype} with serving dtype {str(dtype).removeprefix('torch.')} "
            "is only supported as bfloat16 adapters under float32 serving with --lora-backend cpu"
        )
    cache = config.cache
    sched_config = dataclasses.replace(config.scheduler, max_model_len=max_len)
    decode_kernel = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and cpu_attention.available()
    runner = ModelRunner(
        model, cache.num_blocks, cache.block_size, config.lora.max_loras, config.lora.max_lora_rank, backend,
        decode_kernel, lora_dtype,
    )
    spec = base_model_spec(shape)
    store = open_store(config.lora)
    for line in store.recover():
        log.warning("adapter store %s: %s", config.lora.store_url or config.lora.adapters_dir, line)
    engine_box: list[Engine] = []
    metrics = Metrics(config.metrics) if config.metrics.enabled else None
    if metrics is not None:
        metrics.model_name = config.model.served_name or loaded.name
    loader = DiskLoader(
        store_reader(store.locate, spec, config.lora.max_lora_rank, pin_memory=device.type == "cuda"),
        on_done=lambda: engine_box[0].wake() if engine_box else None,
    )
    residency = Residency(runner.slots, config.lora.host_cache_bytes, loader, metrics)
    blocks = BlockManager(cache.num_blocks, cache.block_size, caching=cache.prefix_caching)
    scheduler = Scheduler(sched_config, blocks, residency, recompute_at=shape.long_rope_after)
    telemetry = Telemetry(metrics, scheduler) if metrics is not None else None
    engine = Engine(runner, scheduler, loaded.tokenizer, eos_ids(loaded), telemetry)
    engine_box.append(engine)
    runner.warmup()
    log.info(
        "engine ready in %.1f s: %s on %s/%s, LoRA backend %s, %d slots x rank %d, KV cache %d tokens "
        "(prefix caching %s), context %d",
        time.monotonic() - started, loaded.name, device, str(dtype).removeprefix("torch."), backend.value,
        config.lora.max_loras, config.lora.max_lora_rank, cache.kv_cache_tokens,
        "on" if cache.prefix_caching else "off", max_len,
    )
    return Serving(
        config=config,
        engine=engine,
        residency=residency,
        tokenizer=loaded.tokenizer,
        store=store,
        spec=spec,
        model_name=config.model.served_name or loaded.name,
        max_model_len=max_len,
        max_lora_rank=config.lora.max_lora_rank,
        created=int(time.time()),
        metrics=metrics,
        grammars=Grammars(loaded.tokenizer, shape.vocab, eos_ids(loaded)),
    )
