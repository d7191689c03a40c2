"""Build and load our small C kernels: one build per instruction set, chosen by what this CPU has at run time.

Each C source is compiled on first use for an ISA level (``avx512``,
``avx2`` or ``portable``) with that level's flags instead of
``-march=native``, and cached per source, flags, compiler and level. The
library for the best level this CPU runs is the one the server uses
(:func:`cpu_isa`); tests load the others too and hold them equal.

The libraries are plain C with OpenMP (no torch headers, so building takes
about a second and can never pull in another torch). torch is imported first,
so each library binds to the ``libgomp.so.1`` torch already loaded and shares
its thread pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch  # noqa: F401  (loads torch's libgomp before ours)

log = logging.getLogger(__name__)

CFLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
_X86 = platform.machine().lower() in ("x86_64", "amd64")
# ISA levels, best first: the gcc flags of each build and the /proc/cpuinfo flags a CPU needs to run it
# (the x86-64 psABI levels v4 and v3; "abm" is how Linux spells LZCNT).
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "avx512": ("-march=x86-64-v4", "-mtune=generic"),
    "avx2": ("-march=x86-64-v3", "-mtune=generic"),
    "portable": ("-march=x86-64", "-mtune=generic") if _X86 else (),
}
_V3 = frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"})
_NEEDS: dict[str, frozenset[str]] = {
    "avx512": _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
    "avx2": _V3,
    "portable": frozenset(),
}
ISAS = tuple(ISA_FLAGS)
_cache_dir = Path.home() / ".cache" / "loraplex" / "kernels"


def set_cache_dir(path: str | os.PathLike[str]) -> None:
    """Build into ``path`` (takes effect for libraries not loaded yet)."""
    global _cache_dir
    _cache_dir = Path(path)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The feature flags Linux reports for this CPU (empty where /proc/cpuinfo is unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


@functools.cache
def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (or the platform's processor string)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def runnable_isas() -> tuple[str, ...]:
    """The ISA levels this CPU can run, best first (``portable`` always)."""
    have = cpu_flags()
    return tuple(isa for isa in ISAS if (_X86 or isa == "portable") and _NEEDS[isa] <= have)


def cpu_isa() -> str:
    """The best ISA level this CPU runs: the build the server uses."""
    return runnable_isas()[0]


class NativeFunction:
    """One C entry point of a :class:`NativeLibrary`: this CPU's build looked up once and kept for the hot path,
    another ISA's build on request (tests compare them)."""

    def __init__(self, library: NativeLibrary, symbol: str, argtypes: list, restype=ctypes.c_int) -> None:
        self.library, self.symbol, self.argtypes, self.restype = library, symbol, argtypes, restype
        self.default: Callable[..., Any] | None = None  # this CPU's build, once loaded

    def get(self, isa: str | None = None) -> Callable[..., Any] | None:
        """The function of the ``isa`` build (default: this CPU's), built and loaded on first use; None when
        it cannot be built here. ValueError for a level this CPU cannot run."""
        if isa is None:
            if self.default is None:
                self.default = self.library.function(self.symbol, self.argtypes, self.restype)
            return self.default
        return self.library.function(self.symbol, self.argtypes, self.restype, isa=isa)

    def available(self, isa: str | None = None) -> bool:
        """Whether the ``isa`` build (default: this CPU's best) is built and loaded; builds it on first call.
        Never raises for this CPU's build; ValueError for a level this CPU cannot run."""
        return self.get(isa) is not None

    def build(self, isa: str) -> Path:
        """Compile the ``isa`` build without loading it (any level gcc knows, runnable on this CPU or not)."""
        return self.library.build(isa)


class NativeLibrary:
    """One C source file, compiled once per ISA level and loaded lazily; ``load()`` never raises.

    ``depends`` are further files (headers) whose content is part of the cache key.
    """

    def __init__(self, source: Path, name: str, cflags: Sequence[str] = (), depends: Sequence[Path] = ()) -> None:
        self.source, self.name = source, name
        self.cflags, self.depends = tuple(cflags), tuple(depends)
        self._lock = threading.Lock()
        self._libs: dict[str, ctypes.CDLL | None] = {}
        self._functions: dict[tuple[str, str], Callable[..., Any] | None] = {}

    def function(self, symbol: str, argtypes: list, restype=ctypes.c_int, isa: str | None = None):
        """The C function ``symbol`` of the ``isa`` build (default: :func:`cpu_isa`) with its ctypes signature
        set, or None when that library is unavailable. Looked up once per symbol and ISA."""
        isa = isa or cpu_isa()
        key = (symbol, isa)
        if key not in self._functions:
            lib = self.load(isa)
            fn = None
            if lib is not None:
                fn = getattr(lib, symbol)
                fn.argtypes, fn.restype = argtypes, restype
            self._functions[key] = fn
        return self._functions[key]

    def load(self, isa: str | None = None) -> ctypes.CDLL | None:
        """The ``isa`` build, loaded; None if it cannot be built here. Raises ValueError for an ISA this CPU
        cannot run (its code would stop the process with an illegal instruction)."""
        isa = isa or cpu_isa()
        if isa not in runnable_isas():
            raise ValueError(f"this CPU ({cpu_model()}) cannot run the {isa} build; it runs {runnable_isas()}")
        if isa not in self._libs:
            with self._lock:
                if isa not in self._libs:
                    lib = None
                    try:
                        lib = ctypes.CDLL(str(self.build(isa)))
                    except Exception as exc:  # no compiler, or a failed build: callers fall back to torch
                        log.warning("native %s (%s) unavailable, falling back to torch ops: %s", self.name, isa, exc)
                    self._libs[isa] = lib
        return self._libs[isa]

    def build(self, isa: str) -> Path:
        """Compile the ``isa`` build (any level gcc knows, runnable here or not) and return its path."""
        flags = self._flags(isa)
        path = _cache_dir / f"{self.name}-{isa}-{self._key(flags)}.so"
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem + "-", suffix=".so.tmp", dir=path.parent)
        os.close(fd)
        try:
            proc = subprocess.run(
                ["gcc", *flags, "-o", tmp, str(self.source)], capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                raise RuntimeError(f"gcc failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
            os.replace(tmp, path)  # atomic; a concurrent build of the same key writes the same bytes
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("built %s", path)
        return path

    def _flags(self, isa: str) -> tuple[str, ...]:
        if isa not in ISA_FLAGS:
            raise ValueError(f"unknown ISA level {isa!r}; expected one of {', '.join(ISAS)}")
        return (*CFLAGS, *self.cflags, *ISA_FLAGS[isa])

    def _key(self, flags: tuple[str, ...]) -> str:
        h = hashlib.sha256(self.source.read_bytes())
        for dep in self.depends:
            h.update(b"\0" + dep.read_bytes())
        h.update("\0".join(flags).encode())
        gcc = subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True, check=True)
        h.update(b"\0" + gcc.stdout.strip().encode())
        return h.hexdigest()[:24]
