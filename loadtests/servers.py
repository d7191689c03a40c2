"""Start a system under test (loraplex or a peer baseline) on 127.0.0.1 for a load run, and always stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from tests.helpers.server_process import free_port, wait_until_up

SYSTEMS = ("loraplex", "peft_swap", "peft_mixed", "merged")


def server_cmd(system: str, store: Path, port: int, loraplex_args: Sequence[str] = ()) -> list[str]:
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r} (choose from {', '.join(SYSTEMS)})")
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
    system: str, store: Path, log_path: Path, timeout: float = 300.0, loraplex_args: Sequence[str] = ()
) -> Iterator[str]:
    """Start ``system``'s server, yield its URL once /ready answers 200, and always stop it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            server_cmd(system, store, port, loraplex_args),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            wait_until_up(proc, url + "/ready", log_path, timeout, poll=0.3)  # the baselines serve /ready too
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
