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
    buffer = bytearray(size)  # writable, so torch.from_numpy can share it without a copy
    with path.open("rb") as f:
        if f.readinto(buffer) != size:
            raise InvalidAdapter(f"{WEIGHTS_FILE} changed while being read")
    out: dict[str, np.ndarray] = {}
    for key in keys:
        info = manifest.tensors[key]
        dtype = np.dtype(NUMPY_DTYPES[info.dtype])
        count = (info.end - info.start) // dtype.itemsize
        try:
            array = np.frombuffer(buffer, dtype=dtype, count=count, offset=manifest.data_offset + info.start)
        except ValueError:
            raise InvalidAdapter(f"{WEIGHTS_FILE} changed while being read") from None
        array = array.reshape(info.shape)
        if not _finite(array, info.dtype):
            raise InvalidAdapter(f"tensor {key!r} contains NaN or Inf")
        out[key] = array
    return out


def _finite(array: np.ndarray, dtype: str) -> bool:
    if dtype == "BF16":
        return not bool(((array & _BF16_EXPONENT) == _BF16_EXPONENT).any())
    return bool(np.isfinite(array).all())
