"""The C/OpenMP mixed-adapter LoRA kernel for CPU (fp32 and bf16), built on first use.

The source (``_lora_kernel.c``) is compiled with gcc into a cache directory,
under a name keyed by the source, the flags, the compiler version and the
CPU's feature flags, then loaded with ctypes. torch is imported first so the
library binds to the ``libgomp.so.1`` torch already loaded and shares its
OpenMP thread pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import struct
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

_log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("_lora_kernel.c")
_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-shared", "-fPIC")
_F32, _BF16, _I32 = torch.float32, torch.bfloat16, torch.int32
# {bf16, y, ldy, x, ldx, a, bt, scale, rank, slots, T, d_in, d_out, S, R, threads}: see the C source
_pack = struct.Struct("16q").pack
_ERRORS = {
    1: "a slot index is >= the number of slots",
    2: "a slot's rank is outside [0, R]",
    3: "could not allocate the kernel's scratch buffer",
    4: "invalid sizes",
}

_cache_dir = Path.home() / ".cache" / "loraplex" / "kernels"
_lock = threading.Lock()
_tried = False
_fn: Callable[[bytes], int] | None = None  # the packed entry point, once loaded


def set_cache_dir(path: str | os.PathLike[str]) -> None:
    """Build into ``path`` instead of ``~/.cache/loraplex/kernels`` (takes effect before first use)."""
    global _cache_dir
    _cache_dir = Path(path)


def available() -> bool:
    """Whether the kernel is built and loaded; builds it on first call. Never raises."""
    if not _tried:
        _load()
    return _fn is not None


def _library_path() -> Path:
    """Where the shared library for this source, compiler and CPU lives (built or not)."""
    return _cache_dir / f"lora_kernel-{_build_key()}.so"


def add_lora_sparse(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    scale: torch.Tensor,
    rank: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Add each token's low-rank term into ``y`` in place (CPU, fp32 or bf16).

    Shapes: ``y [T, d_out]`` and ``x [T, d_in]`` with unit column stride (any
    row stride, so ``y`` may be a column slice of a wider output);
    ``a [S, R, d_in]``, ``bt [S, R, d_out]`` (B transposed), ``scale [S]``
    float32, ``rank [S]`` int32 and ``slots [T]`` int32, all contiguous.
    ``x``, ``y``, ``a`` and ``bt`` share one dtype, float32 or bfloat16.

    Semantics::

        for t in range(T):
            s = slots[t]
            if s < 0 or rank[s] == 0: continue       # exactly zero contribution
            r = rank[s]
            y[t] += scale[s] * (x[t] @ a[s, :r].T) @ bt[s, :r]

    Accumulated in fp32; bf16 ``y`` is rounded to nearest even once, when
    stored. Raises ValueError on bad arguments (checked before ``y`` is touched).
    """
    fn = _fn
    if fn is None:
        if not available():
            raise RuntimeError("the CPU LoRA kernel is not available (see the logged build warning)")
        fn = _fn
    dt = x.dtype
    if dt is _F32:
        bf16 = 0
    elif dt is _BF16:
        bf16 = 1
    else:
        raise ValueError(f"x must be float32 or bfloat16, got {dt}")
    if not (
        y.dtype is dt
        and a.dtype is dt
        and bt.dtype is dt
        and scale.dtype is _F32
        and rank.dtype is _I32
        and slots.dtype is _I32
    ):
        raise ValueError(
            f"expected y, a, bt of x's dtype {dt}, scale float32, rank and slots int32; got y {y.dtype}, "
            f"a {a.dtype}, bt {bt.dtype}, scale {scale.dtype}, rank {rank.dtype}, slots {slots.dtype}"
        )
    if not (y.is_cpu and x.is_cpu and a.is_cpu and bt.is_cpu and scale.is_cpu and rank.is_cpu and slots.is_cpu):
        raise ValueError("all tensors must be on the CPU")
    try:
        t, d_in = x.shape
        t_y, d_out = y.shape
        s, r, d_in_a = a.shape
        s_bt, r_bt, d_out_bt = bt.shape
        (s_scale,) = scale.shape
        (s_rank,) = rank.shape
        (t_slots,) = slots.shape
    except ValueError:
        raise ValueError(_shape_message(y, x, a, bt, scale, rank, slots)) from None
    if (
        t_y != t
        or t_slots != t
        or d_in_a != d_in
        or d_out_bt != d_out
        or s_bt != s
        or r_bt != r
        or s_scale != s
        or s_rank != s
    ):
        raise ValueError(_shape_message(y, x, a, bt, scale, rank, slots))
    ldx, x_col = x.stride()
    ldy, y_col = y.stride()
    if (x_col != 1 and d_in > 1) or (y_col != 1 and d_out > 1) or (ldy < d_out and t > 1):
        raise ValueError(
            f"x and y need unit column stride and y rows that do not overlap, got strides {x.stride()} and {y.stride()}"
        )
    if not (
        a.is_contiguous()
        and bt.is_contiguous()
        and scale.is_contiguous()
        and rank.is_contiguous()
        and slots.is_contiguous()
    ):
        raise ValueError("a, bt, scale, rank and slots must be contiguous")
    err = fn(
        _pack(
            bf16,
            y.data_ptr(),
            ldy,
            x.data_ptr(),
            ldx,
            a.data_ptr(),
            bt.data_ptr(),
            scale.data_ptr(),
            rank.data_ptr(),
            slots.data_ptr(),
            t,
            d_in,
            d_out,
            s,
            r,
            torch.get_num_threads(),
        )
    )
    if err:
        raise ValueError(f"add_lora_sparse: {_ERRORS.get(err, f'error {err}')}")


def _shape_message(*tensors: torch.Tensor) -> str:
    names = ("y", "x", "a", "bt", "scale", "rank", "slots")
    shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, tensors, strict=True))
    want = "y [T, d_out], x [T, d_in], a [S, R, d_in], bt [S, R, d_out], scale [S], rank [S], slots [T]"
    return f"expected {want}; got {shapes}"


def _load() -> None:
    global _tried, _fn
    with _lock:
        if _tried:
            return
        try:
            path = _build()
            lib = ctypes.CDLL(str(path))
            fn = lib.loraplex_add_lora_sparse_packed
            fn.argtypes = [ctypes.c_char_p]  # the packed int64 arguments, passed without a copy
            fn.restype = ctypes.c_int
            _fn = fn
            _log.debug("loaded CPU LoRA kernel %s (AVX-512: %s)", path, bool(lib.loraplex_kernel_isa()))
        except Exception as exc:  # a missing compiler or a failed build must not take the server down
            _log.warning("CPU LoRA kernel unavailable: %s", exc)
        finally:
            _tried = True


def _build() -> Path:
    """Compile the kernel unless this exact build is cached; return the library's path."""
    path = _library_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + "-", suffix=".so.tmp", dir=path.parent)
    os.close(fd)
    try:
        proc = subprocess.run(["gcc", *_CFLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"gcc failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, path)  # atomic: a concurrent build of the same key writes identical bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _log.info("built CPU LoRA kernel %s", path)
    return path


def _build_key() -> str:
    h = hashlib.sha256()
    h.update(_SOURCE.read_bytes())
    h.update("\0".join(_CFLAGS).encode())
    h.update(b"\0" + _gcc_version().encode())
    h.update(b"\0" + _cpu_flags().encode())
    return h.hexdigest()[:24]


def _gcc_version() -> str:
    proc = subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.strip()
    except OSError:
        pass
    return ""
