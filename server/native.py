"""Build and load our small C kernels: gcc on first use, cached per source, flags, compiler and CPU.

The libraries are plain C with OpenMP (no torch headers, so building takes
about a second and can never pull in another torch). torch is imported first,
so each library binds to the ``libgomp.so.1`` torch already loaded and shares
its thread pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import torch  # noqa: F401  (loads torch's libgomp before ours)

log = logging.getLogger(__name__)

CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-shared", "-fPIC")
_cache_dir = Path.home() / ".cache" / "loraplex" / "kernels"


def set_cache_dir(path: str | os.PathLike[str]) -> None:
    """Build into ``path`` (takes effect for libraries not loaded yet)."""
    global _cache_dir
    _cache_dir = Path(path)


class NativeLibrary:
    """One C source file, compiled once and loaded lazily; ``load()`` never raises."""

    def __init__(self, source: Path, name: str) -> None:
        self.source, self.name = source, name
        self._lock = threading.Lock()
        self._tried = False
        self._lib: ctypes.CDLL | None = None

    def function(self, symbol: str, argtypes: list, restype=ctypes.c_int):
        """The C function ``symbol`` with its ctypes signature set, or None when the library is unavailable."""
        lib = self.load()
        if lib is None:
            return None
        fn = getattr(lib, symbol)
        fn.argtypes, fn.restype = argtypes, restype
        return fn

    def load(self) -> ctypes.CDLL | None:
        if not self._tried:
            with self._lock:
                if not self._tried:
                    try:
                        self._lib = ctypes.CDLL(str(self._build()))
                    except Exception as exc:  # no compiler, or a failed build: callers fall back to torch
                        log.warning("native %s unavailable, falling back to torch ops: %s", self.name, exc)
                    self._tried = True
        return self._lib

    def _build(self) -> Path:
        path = _cache_dir / f"{self.name}-{self._key()}.so"
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem + "-", suffix=".so.tmp", dir=path.parent)
        os.close(fd)
        try:
            proc = subprocess.run(
                ["gcc", *CFLAGS, "-o", tmp, str(self.source)], capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                raise RuntimeError(f"gcc failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
            os.replace(tmp, path)  # atomic; a concurrent build of the same key writes the same bytes
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("built %s", path)
        return path

    def _key(self) -> str:
        h = hashlib.sha256(self.source.read_bytes())
        h.update("\0".join(CFLAGS).encode())
        gcc = subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True, check=True)
        h.update(b"\0" + gcc.stdout.strip().encode() + b"\0" + _cpu_flags().encode())
        return h.hexdigest()[:24]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.strip() for line in f if line.startswith("flags")), "")
    except OSError:
        return ""
