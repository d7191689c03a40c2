"""llama-server as a system under test: its command line for a workload, and our requests in its dialect.

A fair configuration on this CPU: 2 threads for decode and for prompt processing (``-t 2 -tb 2``, as loraplex's
2 torch threads), one slot per concurrent request (``-np``), each slot's context long enough for one request's
prompt and output, continuous batching on, every adapter loaded at start (``--lora``, with
``--lora-init-without-apply``) and applied to a request only when it names it. The host prompt cache is off
(``--cache-ram 0``): the workloads never repeat a prompt, and loraplex keeps no prefix cache either.

llama-server picks adapters per request from a body field, ``"lora": [{"id": <index in --lora order>,
"scale": 1.0}]`` (adapters not listed get scale 0), and batches only requests with the same adapter scales (one
adapter set per decode step). A request without ``lora``, or with an empty list, gets the start-up scales, and in
this build those stay 1.0 for every ``--lora`` adapter even with ``--lora-init-without-apply`` (the flag only
leaves the context unadapted until the first request): so every base request lists every adapter at scale 0.
``max_tokens`` is its ``n_predict``; ``ignore_eos`` (a -inf bias on end-of-generation tokens) and
``stream_options.include_usage`` are honoured; the last chunk before ``[DONE]`` has empty text and the usage.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

THREADS = 2
CTX_MARGIN = 64  # tokens per slot beyond prompt + output (BOS, tokenizer slack)
CTX_ROUND = 256


def slot_context(prompt_tokens: int, output_tokens: int) -> int:
    """A slot's context: one request's prompt and output plus a margin, rounded up to a multiple of 256."""
    need = prompt_tokens + output_tokens + CTX_MARGIN
    return -(-need // CTX_ROUND) * CTX_ROUND


@dataclass(frozen=True)
class LlamaServerConfig:
    """One llama-server: a GGUF model, the adapters it loads (their order is the id a request names), its slots."""

    binary: Path
    model: Path
    alias: str  # the model name /v1/models reports (loraplex's base model name)
    loras: tuple[tuple[str, Path], ...] = ()  # (adapter name, its GGUF), in --lora order
    parallel: int = 1  # slots: the workload's concurrency
    slot_ctx: int = 512  # context per slot (see slot_context)
    threads: int = THREADS

    def __post_init__(self) -> None:
        if self.parallel < 1 or self.slot_ctx < 1 or self.threads < 1:
            raise ValueError("parallel, slot_ctx and threads must be >= 1")
        names = [name for name, _ in self.loras]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names repeat: {names}")
        if any("," in str(path) for _, path in self.loras):
            raise ValueError("an adapter path holds a comma, which --lora would split")

    @property
    def lora_ids(self) -> dict[str, int]:
        """Adapter name -> the id llama-server knows it by (its position in --lora order)."""
        return {name: i for i, (name, _) in enumerate(self.loras)}

    def command(self, port: int) -> list[str]:
        cmd = [
            str(self.binary),
            "--model",
            str(self.model),
            "--alias",
            self.alias,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--threads",
            str(self.threads),
            "--threads-batch",
            str(self.threads),
            "--parallel",
            str(self.parallel),
            "--ctx-size",
            str(self.parallel * self.slot_ctx),
            "--cont-batching",
            "--cache-ram",
            "0",
        ]
        if self.loras:  # one comma-separated --lora: a repeated flag is deprecated ("only last value will be used")
            cmd += ["--lora", ",".join(str(path) for _, path in self.loras), "--lora-init-without-apply"]
        return cmd


def lora_field(lora_ids: Mapping[str, int], adapter: str | None) -> list[dict[str, Any]]:
    """The ``lora`` field of one request: ``adapter`` at scale 1, every other loaded adapter at 0 (all 0: base).

    Raises KeyError for an adapter the server has not loaded.
    """
    if adapter is not None and adapter not in lora_ids:
        raise KeyError(f"adapter {adapter!r} is not loaded in llama-server (it has {sorted(lora_ids)})")
    return [{"id": i, "scale": 1.0 if name == adapter else 0.0} for name, i in lora_ids.items()]


def llama_body(body: Mapping[str, Any], lora_ids: Mapping[str, int], alias: str) -> dict[str, Any]:
    """Our client's ``/v1/completions`` body as llama-server takes it.

    ``model`` naming an adapter (or the base, ``alias`` or empty) becomes the ``lora`` field (see
    :func:`lora_field`) and ``model`` the base name. At temperature 0 ``top_k: 1`` is added: greedy either way,
    and llama.cpp then skips sorting the vocabulary for its default top-k 40.
    """
    out = dict(body)
    model = out.get("model")
    adapter = model if model and model != alias else None
    if lora_ids:
        out["lora"] = lora_field(lora_ids, adapter)
    elif adapter is not None:
        raise KeyError(f"adapter {adapter!r} is not loaded in llama-server (it has none)")
    out["model"] = alias
    if out.get("temperature") == 0:
        out["top_k"] = 1
    return out


def system_info(binary: Path, model: Path, port: int, timeout: float = 30.0) -> str | None:
    """The build's ``system_info`` line (threads, the CPU features it was compiled for), from a short start.

    llama-server logs it only at trace verbosity (``-lv 4``), which the measured servers do not use: this
    starts one with it, reads the line and stops it.
    """
    cmd = [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--threads", str(THREADS), "--no-warmup", "-lv", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    deadline = time.monotonic() + timeout
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "system_info:" in line:
                return line.split("system_info:", 1)[1].strip()
            if time.monotonic() > deadline:
                break
        return None
    finally:
        proc.kill()
        proc.wait()
