"""A local Ray cluster with Serve, bound to loopback only, that leaves no process behind.

Ray picks the machine's address for its node unless told it is a single-machine
cluster (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when ``ray`` is first
imported); then its GCS, raylet, workers and agents all bind 127.0.0.1. Token
auth stays on, with a token in the environment (nothing written to ~/.ray);
usage stats are off (no reporting home).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import pytest

RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node IP = loopback
    "RAY_AUTH_MODE": "token",
    "RAY_USAGE_STATS_ENABLED": "0",
}


@contextmanager
def local_serve(http_port: int, num_cpus: int = 2, env: dict[str, str] | None = None) -> Iterator[None]:
    """ray.init + serve.start (HTTP on 127.0.0.1:``http_port``); on the way out, even on failure,
    serve.shutdown + ray.shutdown, then wait for every process Ray started to exit (killing stragglers,
    and failing, after 30 s) and put back the environment and SIGTERM handler Ray changed. ``env``: variables
    the cluster's processes inherit (e.g. AWS credentials)."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("LORAPLEX_")]:
            mp.delenv(key)  # replicas read LORAPLEX_* as flag fallbacks: only the test's flags count
        for key, value in {**RAY_ENV, "RAY_AUTH_TOKEN": secrets.token_hex(32), **(env or {})}.items():
            mp.setenv(key, value)
        environ = dict(os.environ)  # importing ray sets RAY_CLIENT_MODE, ray.init PYTHONBREAKPOINT
        ray = pytest.importorskip("ray")
        serve = pytest.importorskip("ray.serve")
        temp_dir = tempfile.mkdtemp(prefix="loraplex-ray-")  # short: Ray's socket paths must fit in 107 bytes
        on_sigterm = signal.getsignal(signal.SIGTERM)  # ray.init replaces it
        try:
            context = ray.init(
                num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp_dir,
                object_store_memory=100 << 20, log_to_driver=True,  # replica logs show under a failing test
            )
            node_ip = context.address_info["node_ip_address"]
            assert is_loopback(node_ip), f"Ray's node address is {node_ip}: was ray imported before local_serve?"
            serve.start(http_options={"host": "127.0.0.1", "port": http_port})
            yield
        finally:
            try:
                if ray.is_initialized():
                    serve.shutdown()
            finally:
                ray.shutdown()
                started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
                _, alive = psutil.wait_procs(started, timeout=30)
                for p in alive:
                    p.kill()
                shutil.rmtree(temp_dir, ignore_errors=True)
                signal.signal(signal.SIGTERM, on_sigterm)
                os.environ.clear()
                os.environ.update(environ)
                assert not alive, f"Ray processes still running 30 s after shutdown: {[p.pid for p in alive]}"


def listening_addresses() -> list[tuple[str, tuple[str, int]]]:
    """(process name, (address, port)) of every listening TCP socket and bound UDP socket of this process
    and its descendants."""
    found = []
    for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            sockets = p.net_connections(kind="inet")
            name = p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found += [
            (name, (s.laddr.ip, s.laddr.port))
            for s in sockets
            if s.status == psutil.CONN_LISTEN or (s.status == psutil.CONN_NONE and not s.raddr)
        ]
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback
