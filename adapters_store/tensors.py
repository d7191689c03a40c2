"""Read an adapter's tensors with numpy (no torch): for validation on any thread and for the loader.

The file is read once into one buffer; each tensor is a view into it, in the
dtype it was stored in (bfloat16 as its raw ``uint16`` bits).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adapters_store.errors import InvalidAdapter
from adapters_store.peft_format import WEIGHTS_FILE, AdapterManifest

NUMPY_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "BF16": np.uint16}
_BF16_EXPONENT = 0x7F80  # all exponent bits set: Inf or NaN


def read_tensors(folder: Path, manifest: AdapterManifest, keys: list[str]) -> dict[str, np.ndarray]:
    """The tensors named by ``keys``, checked finite; raises :class:`InvalidAdapter` on NaN or Inf."""
    path = folder / WEIGHTS_FILE
    size = path.stat().st_size
    buffer = np.empty(size, dtype=np.uint8)  # writable (torch.from_numpy shares it), and not zeroed first
    with path.open("rb") as f:
        if f.readinto(buffer.data) != size:
            raise InvalidAdapter(f"{WEIGHTS_FILE} changed while being read")
    out = {key: _view(buffer, manifest, key) for key in keys}
    if not _span_finite(buffer, manifest, keys):  # something is not finite (or no one-pass check): find what
        for key in keys:
            if not _finite(out[key], manifest.tensors[key].dtype):
                raise InvalidAdapter(f"tensor {key!r} contains NaN or Inf")
    return out


def _view(buffer: np.ndarray, manifest: AdapterManifest, key: str) -> np.ndarray:
    info = manifest.tensors[key]
    dtype = np.dtype(NUMPY_DTYPES[info.dtype])
    count = (info.end - info.start) // dtype.itemsize
    try:
        array = np.frombuffer(buffer, dtype=dtype, count=count, offset=manifest.data_offset + info.start)
    except ValueError:
        raise InvalidAdapter(f"{WEIGHTS_FILE} changed while being read") from None
    return array.reshape(info.shape)


def _span_finite(buffer: np.ndarray, manifest: AdapterManifest, keys: list[str]) -> bool:
    """One pass over the bytes from the first to the last of ``keys`` when they share a dtype.

    True: every value there is finite. False: a value there is not (perhaps in a tensor that is
    not asked for), or the tensors differ in dtype; the caller then checks tensor by tensor.
    """
    infos = [manifest.tensors[k] for k in keys]
    if not infos or len({i.dtype for i in infos}) != 1:
        return False
    dtype = np.dtype(NUMPY_DTYPES[infos[0].dtype])
    start, end = min(i.start for i in infos), max(i.end for i in infos)
    if any((i.start - start) % dtype.itemsize or (i.end - start) % dtype.itemsize for i in infos):
        return False  # a tensor would be read off its element boundaries: its values would not be checked
    try:
        count, offset = (end - start) // dtype.itemsize, manifest.data_offset + start
        span = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
    except ValueError:
        return False
    return _finite(span, infos[0].dtype)


def _finite(array: np.ndarray, dtype: str) -> bool:
    if array.size == 0:
        return True
    if dtype == "BF16":
        return not bool(((array & _BF16_EXPONENT) == _BF16_EXPONENT).any())
    # min and max propagate NaN and reach any infinity, in two passes without a temporary array
    return bool(np.isfinite(array.min()) and np.isfinite(array.max()))
