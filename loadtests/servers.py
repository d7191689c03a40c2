"""Start a system under test (loraplex, a peer baseline, llama-server) on 127.0.0.1 for a load run; always stop it.

The ``llama_cpp_<precision>`` systems are llama-server serving a GGUF of the default model at that precision;
their command comes from a :class:`~loadtests.llama_cpp.server.LlamaServerConfig` (model, adapters, slots),
made by the caller after converting the files (``loadtests.bench.vs_llama_cpp``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from loadtests.llama_cpp.convert import PRECISIONS
from loadtests.llama_cpp.server import LlamaServerConfig
from tests.helpers.server_process import Running, free_port, wait_until_up

SYSTEMS = ("loraplex", "peft_swap", "peft_mixed", "merged")  # started from an adapter store alone
LLAMA_CPP_SYSTEMS = tuple(f"llama_cpp_{p}" for p in PRECISIONS)  # started from a LlamaServerConfig
SCRUBBED_ENV = ("LORAPLEX_", "LLAMA_ARG_")  # settings a server would read from our environment


def ready_path(system: str) -> str:
    """The route that answers 200 once ``system`` can serve: llama-server's /health, our servers' /ready."""
    return "/health" if system in LLAMA_CPP_SYSTEMS else "/ready"


def server_cmd(
    system: str,
    store: Path,
    port: int,
    loraplex_args: Sequence[str] = (),
    llama: LlamaServerConfig | None = None,
) -> list[str]:
    if system not in SYSTEMS + LLAMA_CPP_SYSTEMS:
        raise ValueError(f"unknown system {system!r} (choose from {', '.join(SYSTEMS + LLAMA_CPP_SYSTEMS)})")
    if system in LLAMA_CPP_SYSTEMS:
        if llama is None:
            raise ValueError(f"{system} needs a LlamaServerConfig (the GGUF model and adapters to serve)")
        return llama.command(port)
    if system == "loraplex":
        return [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--adapters-dir",
            str(store),
            *loraplex_args,
        ]
    return [sys.executable, "-m", f"loadtests.baselines.{system}", "--adapters-dir", str(store), "--port", str(port)]


@contextmanager
def running(
    system: str,
    store: Path,
    log_path: Path,
    timeout: float = 300.0,
    loraplex_args: Sequence[str] = (),
    llama: LlamaServerConfig | None = None,
) -> Iterator[Running]:
    """Start ``system``'s server, yield its URL (with ``.pid``) once it is ready, and always stop it."""
    port = free_port()
    url = Running(f"http://127.0.0.1:{port}")
    cmd = server_cmd(system, store, port, loraplex_args, llama)
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED_ENV)}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        url.pid = proc.pid
        try:
            wait_until_up(proc, url + ready_path(system), log_path, timeout, poll=0.3)
            yield url
        finally:
            stop(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(30)
    with suppress(ProcessLookupError, PermissionError):  # anything left in the server's own process group
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
