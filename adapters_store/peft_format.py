"""PEFT's LoRA format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Reading the manifest parses the config and the safetensors header only (no
tensor data, no torch), so the HTTP side can validate an adapter cheaply.
Binding checks it against the served base model.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_store.base_family import check_family
from adapters_store.base_model import BaseModelSpec
from adapters_store.errors import InvalidAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 64 << 20
FLOAT_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}

_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[A-Za-z0-9_\-]+)?\.weight")
# Config fields that change what a LoRA layer computes, refused when set: (field, feature).
_UNSUPPORTED_CONFIG = (
    ("use_dora", "DoRA"),
    ("modules_to_save", "modules_to_save (fully trained extra modules)"),
    ("trainable_token_indices", "trainable tokens (embedding changes)"),
    ("lora_bias", "LoRA bias"),
    ("fan_in_fan_out", "fan_in_fan_out (Conv1D layers)"),
    ("layer_replication", "layer replication"),
    ("target_parameters", "LoRA on parameters (target_parameters)"),
    ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"),
    ("use_qalora", "QA-LoRA"),
    ("use_bdlora", "block-diagonal LoRA"),
    ("arrow_config", "Arrow routing"),
)
_UNSUPPORTED_KEYS = (
    ("lora_magnitude_vector", "DoRA (use_dora)"),
    ("lora_embedding_A", "embedding LoRA"),
    ("lora_embedding_B", "embedding LoRA"),
    ("modules_to_save", "modules_to_save"),
)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offsets into the data section
    end: int


@dataclass(frozen=True)
class AdapterManifest:
    """A PEFT LoRA adapter's config and tensor table, read without loading tensors."""

    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_offset: int  # where the safetensors data section starts in the file


@dataclass(frozen=True)
class ModuleBinding:
    module: str
    rank: int
    scale: float
    a_key: str
    b_key: str


@dataclass(frozen=True)
class AdapterBinding:
    """An adapter checked against the base model: which modules it changes, at which rank and scale."""

    modules: tuple[ModuleBinding, ...]

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules)

    @property
    def target_modules(self) -> list[str]:
        return sorted({m.module.rsplit(".", 1)[-1] for m in self.modules})


def read_manifest(folder: Path) -> AdapterManifest:
    """Parse ``adapter_config.json`` and the safetensors header of an adapter folder."""
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise InvalidAdapter(f"{CONFIG_FILE} is missing")
    if not weights_path.is_file():
        if (folder / PICKLE_FILE).exists():
            raise InvalidAdapter(
                f"{PICKLE_FILE} is a pickle file, which can execute code when loaded; "
                f"convert it to {WEIGHTS_FILE} (safetensors)"
            )
        raise InvalidAdapter(f"{WEIGHTS_FILE} is missing")
    config = parse_config(config_path.read_bytes()[: MAX_CONFIG_BYTES + 1])
    tensors, data_offset = _read_safetensors_header(weights_path)
    return AdapterManifest(config=config, tensors=tensors, data_offset=data_offset)


def parse_config(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidAdapter(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must hold a JSON object")
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise InvalidAdapter(f'{CONFIG_FILE} has no peft_type (expected "LORA")')
    if str(peft_type).upper() != "LORA":
        raise InvalidAdapter(f"peft_type {peft_type!r} is not supported (LORA only)")
    for key, feature in _UNSUPPORTED_CONFIG:
        if config.get(key):
            raise InvalidAdapter(f"{feature} is not supported ({key}={_short(config[key])})")
    if config.get("bias", "none") not in ("none", None):
        raise InvalidAdapter(f"bias={config['bias']!r} is not supported (only 'none')")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise InvalidAdapter(f"{key} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise InvalidAdapter(f"{key} must be an object")
    return config


def _read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], int]:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InvalidAdapter(f"{WEIGHTS_FILE} is truncated")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise InvalidAdapter(f"{WEIGHTS_FILE} has an invalid header length")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InvalidAdapter(f"{WEIGHTS_FILE} has a corrupt header") from None
    if not isinstance(header, dict):
        raise InvalidAdapter(f"{WEIGHTS_FILE} has a corrupt header")
    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InvalidAdapter(f"{WEIGHTS_FILE}: malformed entry for tensor {key!r}") from None
        if dtype not in FLOAT_DTYPES:
            raise InvalidAdapter(f"tensor {key!r} has dtype {dtype}; floating point expected")
        if not (0 <= start <= end <= data_size) or end - start != math.prod(shape) * FLOAT_DTYPES[dtype]:
            raise InvalidAdapter(f"{WEIGHTS_FILE}: tensor {key!r} has inconsistent offsets")
        tensors[key] = TensorInfo(dtype=dtype, shape=shape, start=start, end=end)
    return tensors, 8 + n


def bind(manifest: AdapterManifest, spec: BaseModelSpec, max_rank: int) -> AdapterBinding:
    """Check every tensor against the base model; return the modules the adapter changes."""
    pairs: dict[str, dict[str, str]] = {}
    for key in manifest.tensors:
        for marker, feature in _UNSUPPORTED_KEYS:
            if marker in key:
                raise InvalidAdapter(f"{feature} is not supported (tensor {key!r})")
        m = _KEY.fullmatch(key)
        if m is None:
            raise InvalidAdapter(f"tensor {key!r} is not a LoRA A/B weight of a base-model module")
        pairs.setdefault(m["module"], {})[m["kind"]] = key
    if not pairs:
        raise InvalidAdapter("the adapter has no LoRA tensors")
    config = manifest.config
    check_family(config, spec.architecture)
    modules: list[ModuleBinding] = []
    for module, kinds in sorted(pairs.items()):
        if module not in spec.modules:
            short = module.rsplit(".", 1)[-1]
            if module in spec.other_modules:
                raise InvalidAdapter(f"LoRA on {short} ({module}) is not supported")
            raise InvalidAdapter(f"module {module!r} does not exist in the base model (or is not a LoRA target)")
        if set(kinds) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(kinds)).pop()
            raise InvalidAdapter(f"module {module!r} has no {missing} tensor")
        d_in, d_out = spec.modules[module]
        a, b = manifest.tensors[kinds["lora_A"]], manifest.tensors[kinds["lora_B"]]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != d_in or b.shape[0] != d_out:
            raise InvalidAdapter(
                f"shape mismatch at {module}: lora_A {list(a.shape)}, lora_B {list(b.shape)}; "
                f"the base model needs lora_A [r, {d_in}] and lora_B [{d_out}, r]"
            )
        rank = a.shape[0]
        if b.shape[1] != rank or rank < 1:
            raise InvalidAdapter(f"rank mismatch at {module}: lora_A has rank {rank}, lora_B {b.shape[1]}")
        if rank > max_rank:
            raise InvalidAdapter(f"rank {rank} at {module} exceeds the server's --max-lora-rank {max_rank}")
        declared = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r"))
        if declared is not None and int(declared) != rank:
            raise InvalidAdapter(f"{module}: config declares rank {declared} but the tensors have rank {rank}")
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        modules.append(ModuleBinding(module, rank, scale, kinds["lora_A"], kinds["lora_B"]))
    return AdapterBinding(modules=tuple(modules))


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern: a key matches a module name suffix (or a regex)."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + key):
            return value
        try:
            if re.fullmatch(rf"(.*\.)?(?:{key})", module):
                return value
        except re.error:
            continue
    return default
