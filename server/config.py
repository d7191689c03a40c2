"""The server's configuration: one tree of frozen dataclasses, validated once at start-up.

Built by :mod:`server.cli` from flags and ``LORAPLEX_*`` variables; nothing
else reads the environment.
"""

from __future__ import annotations

import ipaddress
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from server.engine.scheduler import SchedulerConfig
from server.metrics import MetricsConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
QUANTIZATIONS = ("auto", "none", "int8", "int4")
ACTIVATIONS = ("exact", "int8")
LORA_BACKENDS = ("auto", "cpu", "triton", "torch", "reference")
MIN_API_KEY_LENGTH = 8


def activations_problem(activations: str, quantization: str) -> str | None:
    """Why ``--activations`` cannot go with ``--quantization``, or None."""
    if activations != "exact" and quantization == "none":
        return (
            f"--activations {activations} applies to quantized base weights; with --quantization none every "
            "projection is dense: use --quantization auto (a GGUF model's codes), int8 or int4"
        )
    return None


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None  # transformers directory or .gguf file; None = the embedded default
    served_name: str | None = None  # name clients use for the base model; default: the model's name
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU (measured faster here for decode)
    device: str = "auto"  # auto: CUDA when present, else CPU
    # base weights: auto = a GGUF file's Q8_0/Q4_0/Q4_1 tensors as stored, none = dequantized to dtype,
    # int8 / int4 = quantized at load (CPU, float32 activations); adapters stay full precision
    quantization: str = "auto"
    # activations of quantized projections: exact = fp32 times the dequantized weights (outputs of the
    # dequantized model); int8 = decode steps on 8-bit activations and integer products (llama.cpp's way, faster)
    activations: str = "exact"
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "loraplex")

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}")
        if (problem := activations_problem(self.activations, self.quantization)) is not None:
            raise ValueError(problem)
        if self.quantization in ("int8", "int4") and self.dtype not in ("auto", "float32"):
            raise ValueError(
                f"--quantization {self.quantization} keeps activations in float32: use it with --dtype float32 "
                f"(or auto), not {self.dtype}; with --dtype {self.dtype} use --quantization auto or none"
            )
        if self.quantization in ("int8", "int4") and self.device == "cuda":
            raise ValueError(
                f"--quantization {self.quantization} runs on the CPU only; with --device cuda use --quantization none"
            )


@dataclass(frozen=True)
class LoraModule:
    """One ``--lora-modules`` entry: stored under ``name`` at start-up, validated like an upload."""

    name: str
    path: Path  # a PEFT folder, or a .tar.gz/.zip archive holding one
    base_model_name: str | None = None  # vLLM's field; when given, it must be the served base model's name

    def __post_init__(self) -> None:
        from adapters_store.errors import InvalidAdapterName
        from adapters_store.names import check_name

        try:
            check_name(self.name)
        except InvalidAdapterName as exc:
            raise ValueError(str(exc)) from None

    @classmethod
    def parse(cls, text: str) -> LoraModule:
        """``name=path``, or vLLM's JSON form ``{"name": ..., "path": ..., "base_model_name": ...}``."""
        if text.lstrip().startswith("{"):
            try:
                fields = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc}") from None
            unknown = sorted(set(fields) - {"name", "path", "base_model_name"}) if isinstance(fields, dict) else []
            if not isinstance(fields, dict) or unknown or not {"name", "path"} <= set(fields):
                raise ValueError('the JSON form is {"name": ..., "path": ..., "base_model_name": ...} (name and '
                                 f"path required){'; unknown: ' + ', '.join(unknown) if unknown else ''}")
            if not all(isinstance(v, str) or (k == "base_model_name" and v is None) for k, v in fields.items()):
                raise ValueError("name, path and base_model_name must be strings")
            name, path, base = fields["name"], fields["path"], fields.get("base_model_name")
        else:
            name, sep, path = text.partition("=")
            base = None
            if not sep:
                raise ValueError("expected name=path or a JSON object")
        if not path:
            raise ValueError("the path is empty")
        return cls(name, Path(path).expanduser(), base)


@dataclass(frozen=True)
class LoraConfig:
    adapters_dir: Path = Path("adapters_store/data")  # one folder per adapter name, PEFT format; S3: the cache
    store_url: str = ""  # "" = adapters_dir is the store; s3://bucket/prefix = a bucket shared by replicas
    s3_endpoint_url: str | None = None  # an S3-compatible service other than AWS (MinIO, Ceph, rclone, ...)
    store_refresh: float = 1.0  # seconds a replica trusts what it read of a name in a shared store
    store_cache_bytes: int = 0  # bound on a shared store's disk cache on this replica (0: none)
    max_lora_rank: int = 64  # largest adapter rank accepted; sizes the device slots
    max_loras: int = 16  # device slots: distinct adapters in one step
    host_cache_bytes: int = 2 << 30  # host-memory tier bound
    backend: str = "auto"  # auto: the CPU kernel on CPU when it builds, torch otherwise
    dtype: str = "auto"  # adapter weights in the slots; auto = the serving dtype (exact)
    modules: tuple[LoraModule, ...] = ()  # --lora-modules: stored at start-up; one that fails stops the start

    def __post_init__(self) -> None:
        names = [m.name for m in self.modules]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"--lora-modules names an adapter twice: {', '.join(twice)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"lora dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not 1 <= self.max_lora_rank <= 1024:
            raise ValueError(f"max_lora_rank must be 1..1024, got {self.max_lora_rank}")
        if not 1 <= self.max_loras <= 4096:
            raise ValueError(f"max_loras must be 1..4096, got {self.max_loras}")
        if self.host_cache_bytes < 0:
            raise ValueError("host_cache_bytes must be >= 0")
        if self.backend not in LORA_BACKENDS:
            raise ValueError(f"lora backend must be one of {', '.join(LORA_BACKENDS)}, got {self.backend!r}")
        if self.store_url:
            from adapters_store.s3 import parse_url

            parse_url(self.store_url)  # raises ValueError naming the problem
        if self.store_cache_bytes < 0:
            raise ValueError("store_cache_bytes must be >= 0")
        if not 0 <= self.store_refresh <= 3600:
            raise ValueError(f"store_refresh must be 0..3600 seconds, got {self.store_refresh}")


@dataclass(frozen=True)
class CacheConfig:
    kv_cache_tokens: int = 32768  # KV-cache capacity in tokens, shared by all running requests
    block_size: int = 16  # tokens per KV block
    prefix_caching: bool = True  # full blocks are shared by content (tokens and the weights that computed them)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}")
        if self.kv_cache_tokens < self.block_size:
            raise ValueError(
                f"kv_cache_tokens must be at least one block (block_size {self.block_size}), got {self.kv_cache_tokens}"
            )

    @property
    def num_blocks(self) -> int:
        return self.kv_cache_tokens // self.block_size


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    max_request_bytes: int = 16 << 20  # request bodies over this get 413 (adapter uploads have their own limit)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.max_request_bytes < 1024:
            raise ValueError("max_request_bytes must be at least 1024")

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class AdminConfig:
    token: str | None = None  # bearer token for /admin; None = admin routes only on a loopback bind
    max_upload_bytes: int = 1 << 30  # an adapter upload (or an archive's unpacked files) larger than this gets 413
    allowed_lora_dirs: tuple[Path, ...] = ()  # where POST /v1/load_lora_adapter may read from; empty = nowhere
    operation_timeout: float = 60.0  # seconds admin load/evict/delete wait for loads or running requests

    def __post_init__(self) -> None:
        if self.token is not None and len(self.token) < 16:
            raise ValueError("the admin token must be at least 16 characters")
        if self.max_upload_bytes < 1:
            raise ValueError("max_upload_bytes must be positive")
        if not self.operation_timeout > 0:
            raise ValueError("admin operation timeout must be positive")
        for d in self.allowed_lora_dirs:
            if not d.is_absolute():
                raise ValueError(f"allowed LoRA directories must be absolute paths, got {str(d)!r}")


@dataclass(frozen=True)
class AuthConfig:
    """Inference API keys: key -> adapter glob patterns it may use (empty = all). No keys = no auth."""

    api_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in self.api_keys:
            # Printable ASCII: HTTP headers carry nothing else faithfully.
            if len(key) < MIN_API_KEY_LENGTH or any(not ("!" <= c <= "~") or c == "," for c in key):
                raise ValueError(
                    f"API keys must be at least {MIN_API_KEY_LENGTH} printable ASCII characters without spaces "
                    f"or commas ({key[:3]!r}...)"
                )


@dataclass(frozen=True)
class LimitsConfig:
    """Admission and time limits of inference requests."""

    max_queued_requests: int = 256  # waiting beyond --max-num-seqs running; past it, 429
    request_timeout: float = 0.0  # seconds, 0 = none; a request's own ``timeout`` can only be shorter
    shutdown_timeout: float = 30.0  # seconds SIGTERM waits for in-flight requests before aborting them
    # max_tokens of a chat request that gives none (capped by the context left); 0 = all the context left.
    # KV cache for prompt + max_tokens is reserved when a request starts, so this bounds what one chat holds.
    default_max_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.max_queued_requests < 0:
            raise ValueError("max_queued_requests must be >= 0")
        if self.default_max_tokens < 0:
            raise ValueError("default_max_tokens must be >= 0")
        for name, value in (("request_timeout", self.request_timeout), ("shutdown_timeout", self.shutdown_timeout)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        if self.admin.token is not None and self.admin.token in self.auth.api_keys:
            raise ValueError("the admin token must differ from every inference API key")
