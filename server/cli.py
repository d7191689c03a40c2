"""``loraplex serve``: flags, each with a ``LORAPLEX_*`` variable as fallback, validated at start-up."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import logging
import os
import shlex
import signal
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from server import admin_client
from server.api.keys import load_keys
from server.config import (
    ACTIVATIONS,
    DEVICES,
    DTYPES,
    LORA_BACKENDS,
    QUANTIZATIONS,
    AdminConfig,
    AuthConfig,
    CacheConfig,
    Config,
    HttpConfig,
    LimitsConfig,
    LoraConfig,
    LoraModule,
    ModelConfig,
)
from server.engine.scheduler import SchedulerConfig
from server.flag_errors import flag_error
from server.metrics import DEFAULT_TOP_K, MetricsConfig
from server.version import package_version

_REPO_STORE = Path(__file__).resolve().parent.parent / "adapters_store" / "data"


def default_adapters_dir() -> Path:
    """The checkout's ``adapters_store/data`` when run from one, else a user data directory."""
    if _REPO_STORE.parent.joinpath("__init__.py").exists() and (_REPO_STORE.parent.parent / "pyproject.toml").exists():
        return _REPO_STORE
    return Path.home() / ".local" / "share" / "loraplex" / "adapters"


def _size(text: str) -> int:
    """Bytes from '2G', '512M', '1048576'."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 512M or 2G)") from None


def _switch(text: str) -> bool:
    """A yes/no environment value: on/off, true/false, yes/no, 1/0."""
    value = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False, "0": False}
    try:
        return value[text.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"not on/off: {text!r}") from None


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-adapter LoRA inference server.")
    version = f"loraplex {package_version()}"
    parser.add_argument("--version", action="version", version=version)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="start the HTTP server",
        description="Start the OpenAI-compatible server. Every option can also be set with the "
        "LORAPLEX_<OPTION> environment variable (e.g. LORAPLEX_MAX_LORAS=32); flags win.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument("--version", action="version", version=version)
    admin_client.add_parser(sub, env)

    def opt(flag: str, help: str, default=None, secret: bool = False, **kw) -> None:
        var = "LORAPLEX_" + flag.lstrip("-").upper().replace("-", "_")
        value = env.get(var, default)
        if value is not None and "type" in kw and isinstance(value, str):
            try:
                value = kw["type"](value)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{var}={env[var]!r}: {exc}")
        if "choices" in kw and value is not None and value not in kw["choices"]:
            parser.error(f"{var}={value!r}: choose from {', '.join(kw['choices'])}")
        # A secret's value (from the environment) must not appear in --help: "%(default).0s" prints nothing
        # and stops the formatter from appending "(default: ...)".
        shown = "%(default).0s" if secret or value is None else ""
        serve.add_argument(flag, default=value, help=f"{help} [env {var}]{shown}", **kw)

    opt("--model", "transformers model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    opt("--served-model-name", "name clients use for the base model (default: the model's name)")
    opt(
        "--adapters-dir",
        "adapter store: one PEFT folder per adapter name (with an s3:// --adapter-store: this replica's cache)",
        str(default_adapters_dir()),
        type=Path,
    )
    opt(
        "--adapter-store",
        "s3://bucket/prefix: adapters live in an S3-compatible bucket shared by every replica "
        "(credentials from the AWS variables; needs `pip install loraplex[s3]`); empty = --adapters-dir",
        "",
    )
    opt("--s3-endpoint-url", "S3-compatible service URL (MinIO, Ceph, ...); empty = AWS", "")
    opt(
        "--store-cache-size",
        "with an s3:// store: bound on this replica's disk cache of adapters (e.g. 8G); the least recently "
        "used versions are removed first and fetched again when used; 0 = no bound",
        "0",
        type=_size,
    )
    opt(
        "--store-refresh",
        "seconds a replica trusts what it last read of an adapter in a shared store: a delete or re-upload "
        "through another replica is seen within this time (0 = check on every request)",
        1.0,
        type=float,
    )
    opt(
        "--lora-modules",
        "adapters to store at start-up, each name=path (a PEFT folder or a .tar.gz/.zip) or vLLM's JSON form "
        "'{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'; validated like an upload; one that fails "
        "stops the start-up (env: space-separated, shell-quoted)",
        nargs="+",
        metavar="NAME=PATH",
    )
    opt("--dtype", "serving dtype; auto = bfloat16 on CUDA, float32 on CPU", "auto", choices=DTYPES)
    opt("--device", "auto = CUDA when present, else CPU", "auto", choices=DEVICES)
    opt(
        "--quantization",
        "base weights: auto = a GGUF model's Q8_0/Q4_0/Q4_1 tensors served as stored (others dequantized), "
        "none = all dequantized to --dtype, int8 = per-channel 8-bit, int4 = 4-bit in 32-value groups "
        "(int8/int4: CPU, --dtype float32); adapters stay full precision",
        "auto",
        choices=QUANTIZATIONS,
    )
    opt(
        "--activations",
        "inputs of quantized projections: exact = fp32, so outputs equal the dequantized model's; int8 = decode "
        "steps quantize them to 8 bits per 32 values and take integer dot products, as llama.cpp does (faster, "
        "outputs close to but not equal to exact)",
        "exact",
        choices=ACTIVATIONS,
    )
    opt("--max-lora-rank", "largest adapter rank accepted", 64, type=int)
    opt("--max-loras", "device adapter slots (distinct adapters in one step)", 16, type=int)
    opt("--host-cache", "host-memory adapter cache bound (bytes, or 512M, 2G)", "2G", type=_size)
    opt(
        "--lora-backend", "batched LoRA op; auto = our Triton kernels on CUDA, our C kernel on CPU", "auto",
        choices=LORA_BACKENDS,
    )
    opt(
        "--lora-dtype",
        "adapter weights in device slots; auto = the serving dtype (exact). bfloat16 under float32 serving "
        "halves the adapter bytes each step reads (CPU kernel only; rounds adapter weights to bf16)",
        "auto",
        choices=DTYPES,
    )
    opt("--kv-cache-tokens", "KV-cache capacity in tokens", 32768, type=int)
    opt("--block-size", "tokens per KV-cache block", 16, type=int)
    caching = "LORAPLEX_ENABLE_PREFIX_CACHING"
    try:
        caching_default = _switch(env[caching]) if caching in env else True
    except argparse.ArgumentTypeError as exc:
        parser.error(f"{caching}: {exc}")
    serve.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=caching_default,
        help="reuse the KV blocks of prompt prefixes computed before, keyed by their tokens and the exact adapter "
        f"versions and weights that computed them (default: on) [env {caching}]",
    )
    opt("--max-num-seqs", "running sequences per step", 64, type=int)
    opt("--max-num-batched-tokens", "tokens per step (prefill chunks + decodes)", 512, type=int)
    opt(
        "--max-model-len",
        "context limit per request (default: the model's; the KV cache must hold one request of it)",
        0,
        type=int,
    )
    opt("--cache-dir", "model conversion and kernel cache", str(Path.home() / ".cache" / "loraplex"), type=Path)
    opt(
        "--adapter-wait-timeout",
        "seconds a request waits for its adapter's load or a free slot (then 503)",
        30.0,
        type=float,
    )
    opt(
        "--admin-token",
        "bearer token for /admin (prefer the env variable; without it the admin API only answers on a loopback bind)",
        secret=True,
    )
    opt(
        "--api-keys",
        "comma-separated inference API keys, each allowed every adapter (prefer the env variable); "
        "with any key set, /v1 routes need Authorization: Bearer <key>",
        secret=True,
    )
    opt(
        "--api-keys-file",
        "file of inference API keys, one per line: '<key> [adapter-glob ...]' (no globs = every adapter)",
        type=Path,
    )
    opt("--max-queued-requests", "requests waiting beyond --max-num-seqs running; past it, 429", 256, type=int)
    opt(
        "--default-max-tokens",
        "max_tokens of a chat request that sets none (capped by the context left); 0 = all the context left",
        1024,
        type=int,
    )
    opt("--request-timeout", "seconds after which a request is aborted (504); 0 = none", 0.0, type=float)
    opt("--shutdown-timeout", "seconds SIGTERM waits for in-flight requests before aborting them", 30.0, type=float)
    opt("--metrics", "serve Prometheus metrics at /metrics", "on", choices=("on", "off"))
    opt(
        "--metrics-adapters",
        "comma-separated adapters that get their own `adapter` label on the per-adapter metrics (others: 'other')",
        "",
    )
    opt(
        "--metrics-top-k",
        f"the K busiest adapters get their own `adapter` label, others are 'other' (default {DEFAULT_TOP_K}; "
        "0 = no adapter label; with --metrics-adapters, the allow-list replaces it)",
        type=int,
    )
    opt("--vllm-metrics", "also export vLLM's vllm:num_requests_* and vllm:lora_requests_info gauges", "off",
        choices=("on", "off"))
    opt("--max-upload-size", "largest adapter upload, unpacked (bytes, or 512M, 2G)", "1G", type=_size)
    opt("--allowed-lora-dirs", "comma-separated absolute directories POST /v1/load_lora_adapter may read from", "")
    opt(
        "--admin-timeout",
        "seconds admin load/evict/delete wait for loads or running requests (then 409/503)",
        60.0,
        type=float,
    )
    opt("--max-request-size", "largest request body other than adapter uploads (bytes, or 16M)", "16M", type=_size)
    opt("--host", "bind address", "127.0.0.1")
    opt("--port", "bind port", 8000, type=int)
    opt("--log-level", "logging level", "info", choices=("debug", "info", "warning", "error"))
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(
        metrics=MetricsConfig(
            enabled=args.metrics == "on",
            adapter_allowlist=tuple(a.strip() for a in args.metrics_adapters.split(",") if a.strip()),
            adapter_top_k=args.metrics_top_k,
            vllm_compatible=args.vllm_metrics == "on",
        ),
        auth=AuthConfig(api_keys=load_keys(args.api_keys, args.api_keys_file)),
        limits=LimitsConfig(
            max_queued_requests=args.max_queued_requests,
            request_timeout=args.request_timeout,
            shutdown_timeout=args.shutdown_timeout,
            default_max_tokens=args.default_max_tokens,
        ),
        model=ModelConfig(
            model=args.model,
            served_name=args.served_model_name,
            dtype=args.dtype,
            device=args.device,
            quantization=args.quantization,
            activations=args.activations,
            cache_dir=Path(args.cache_dir),
        ),
        lora=LoraConfig(
            adapters_dir=Path(args.adapters_dir),
            store_url=args.adapter_store,
            s3_endpoint_url=args.s3_endpoint_url or None,
            store_refresh=args.store_refresh,
            store_cache_bytes=args.store_cache_size,
            max_lora_rank=args.max_lora_rank,
            max_loras=args.max_loras,
            host_cache_bytes=args.host_cache,
            backend=args.lora_backend,
            dtype=args.lora_dtype,
            modules=_lora_modules(args.lora_modules),
        ),
        cache=CacheConfig(
            kv_cache_tokens=args.kv_cache_tokens, block_size=args.block_size, prefix_caching=args.enable_prefix_caching
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
            adapter_wait_timeout=args.adapter_wait_timeout,
        ),
        http=HttpConfig(
            host=args.host, port=args.port, log_level=args.log_level, max_request_bytes=args.max_request_size
        ),
        admin=AdminConfig(
            token=args.admin_token or None,
            max_upload_bytes=args.max_upload_size,
            allowed_lora_dirs=tuple(Path(d.strip()) for d in args.allowed_lora_dirs.split(",") if d.strip()),
            operation_timeout=args.admin_timeout,
        ),
    )


def _lora_modules(values: Sequence[str] | str | None) -> tuple[LoraModule, ...]:
    """``--lora-modules`` entries (from ``LORAPLEX_LORA_MODULES``: one shell-quoted string)."""
    if isinstance(values, str):
        values = shlex.split(values)
    modules = []
    for text in values or ():
        try:
            modules.append(LoraModule.parse(text))
        except ValueError as exc:
            raise ValueError(f"--lora-modules {text[:300]!r}: {exc}") from None
    return tuple(modules)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(os.environ)
    args = parser.parse_args(argv)
    if args.command == "adapters":
        return admin_client.run(args)
    try:
        config = config_from_args(args)
    except ValueError as exc:  # named by the flag or variable the user set, not the config field
        line = sys.argv[1:] if argv is None else list(argv)
        parser.error(flag_error(exc, lambda env, words: build_parser(env).parse_args(words), line, os.environ))
    if config.lora.store_url and importlib.util.find_spec("boto3") is None:
        parser.error(f"--adapter-store {config.lora.store_url} needs boto3: pip install 'loraplex[s3]'")
    if config.model.model is not None:
        model_path = Path(config.model.model).expanduser()
        if not model_path.exists():
            parser.error(f"--model {config.model.model}: no such file or directory")
        if model_path.is_dir():
            from server.model.loading import check_directory  # torch and transformers: only for a folder

            try:
                check_directory(model_path)
            except (OSError, ValueError) as exc:  # UnsupportedModel is a ValueError; a folder without a config
                parser.error(f"--model {config.model.model}: {exc}")
    for module in config.lora.modules:
        if not module.path.exists():
            parser.error(f"--lora-modules {module.name}={module.path}: no such file or directory")
    for flag, folder in (("--adapters-dir", config.lora.adapters_dir), ("--cache-dir", config.model.cache_dir)):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            parser.error(f"{flag} {folder}: cannot create it ({exc.strerror})")
    try:  # bind before the model loads: a taken port fails now, not after the load
        sock = listening_socket(config.http.host, config.http.port)
    except OSError as exc:
        parser.error(f"cannot listen on {config.http.host}:{config.http.port}: {exc.strerror or exc}")
    if config.http.port == 0:  # the port the system picked, for the start-up line
        config = dataclasses.replace(config, http=dataclasses.replace(config.http, port=sock.getsockname()[1]))
    logging.basicConfig(level=config.http.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(config, sock)


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # connections made while the server starts wait in the backlog, not refused
    except OSError:
        sock.close()
        raise
    return sock


def serve(config: Config, sock: socket.socket) -> int:
    """Serve at once (``/ready`` says when the model is loaded) until SIGTERM/SIGINT; then stop admitting,
    let in-flight requests finish (up to ``--shutdown-timeout``), abort the rest, stop the engine, exit 0.
    A model that fails to load ends the server with status 1."""
    import uvicorn

    from server.api.app import create_app
    from server.engine.builder import build_serving_in_fresh_thread

    failed: list[BaseException] = []

    def startup_failed(exc: BaseException) -> None:
        failed.append(exc)
        server.should_exit = True

    app = create_app(lambda: build_serving_in_fresh_thread(config), on_startup_failure=startup_failed)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            state = getattr(app.state, "loraplex", None)
            if state is not None:
                state.admission.closed = True  # requests on open connections now get 503
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises the signal after its graceful shutdown, so the process would die of it;
            # a drained server exits with status 0 instead.
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    server = DrainingServer(
        uvicorn.Config(
            app,
            host=config.http.host,
            port=config.http.port,
            log_level=config.http.log_level,
            timeout_graceful_shutdown=config.limits.shutdown_timeout,
            # the same event loop and HTTP parser whether or not uvloop/httptools are installed (Ray's
            # uvicorn[standard] brings them): the behaviour the tests check is the behaviour served
            loop="asyncio",
            http="h11",
        )
    )
    server.run(sockets=[sock])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
