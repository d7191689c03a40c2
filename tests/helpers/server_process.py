"""Start ``loraplex serve`` as a real subprocess on 127.0.0.1 and stop it afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx


class Running(str):
    """The server's base URL, with the process id beside it."""

    pid: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc: subprocess.Popen, url: str, log_path: Path, timeout: float, poll: float = 0.1) -> None:
    """Wait until ``url`` answers 200; fail with the log's tail if ``proc`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not up after {timeout} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(poll)


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def share_kernels(cache_dir: Path) -> None:
    """Link ``cache_dir/kernels`` to the machine's kernel cache (``~/.cache/loraplex/kernels``, where servers
    started without ``--cache-dir`` build them) unless it exists: building the C kernels takes about 20 s per
    cache, and they are not what a test of a server's behaviour is about. Builds are atomic renames, so
    servers can share them."""
    kernels = cache_dir / "kernels"
    if kernels.exists() or kernels.is_symlink():
        return
    shared = Path.home() / ".cache" / "loraplex" / "kernels"
    shared.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    kernels.symlink_to(shared, target_is_directory=True)


@contextmanager
def running_server(args: list[str], log_path: Path, timeout: float = 180.0, env: dict[str, str] | None = None):
    """``env``: variables added to the process's environment (LORAPLEX_* ones are otherwise stripped). A fresh
    ``--cache-dir`` gets the machine's C kernel builds linked in (:func:`share_kernels`)."""
    if "--cache-dir" in args:
        share_kernels(Path(args[args.index("--cache-dir") + 1]))
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")} | (env or {})
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
        base = Running(f"http://127.0.0.1:{port}")
        base.pid = proc.pid
        try:
            wait_until_up(proc, base + "/ready", log_path, timeout)
            yield base
        finally:
            stop(proc)
