"""Check an adapter folder against the served base model before it is stored or served."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapters_store.backend import ADAPTER_FILES
from adapters_store.base_model import BaseModelSpec
from adapters_store.peft_format import AdapterBinding, AdapterManifest, bind, read_manifest
from adapters_store.tensors import read_tensors


@dataclass(frozen=True)
class AdapterSummary:
    """What an operator wants to know of a valid adapter, as shown by the admin API."""

    rank: int  # the largest rank over its modules
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]  # short names: q_proj, v_proj, ...
    modules: int  # bound linear layers
    dtypes: tuple[str, ...]  # safetensors dtypes of its tensors
    bytes: int  # size of its files
    base_model_name_or_path: str | None  # as the config says; informative only

    def as_dict(self) -> dict:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "target_modules": list(self.target_modules),
            "modules": self.modules,
            "dtypes": list(self.dtypes),
            "bytes": self.bytes,
            "base_model_name_or_path": self.base_model_name_or_path,
        }


def inspect(folder: Path, spec: BaseModelSpec, max_rank: int) -> tuple[AdapterManifest, AdapterBinding]:
    """Config and tensor table checked against the base model; tensor values are not read."""
    manifest = read_manifest(folder)
    return manifest, bind(manifest, spec, max_rank)


def summarize(folder: Path, manifest: AdapterManifest, binding: AdapterBinding) -> AdapterSummary:
    config = manifest.config
    base = config.get("base_model_name_or_path")
    return AdapterSummary(
        rank=binding.max_rank,
        alpha=float(config.get("lora_alpha", 8)),
        use_rslora=bool(config.get("use_rslora")),
        target_modules=tuple(binding.target_modules),
        modules=len(binding.modules),
        dtypes=tuple(
            sorted(
                {manifest.tensors[m.a_key].dtype for m in binding.modules}
                | {manifest.tensors[m.b_key].dtype for m in binding.modules}
            )
        ),
        bytes=sum((folder / f).stat().st_size for f in ADAPTER_FILES),
        base_model_name_or_path=base if isinstance(base, str) else None,
    )


def validate(folder: Path, spec: BaseModelSpec, max_rank: int) -> AdapterSummary:
    """Everything :func:`inspect` checks, plus every tensor value finite. Raises ``InvalidAdapter``."""
    manifest, binding = inspect(folder, spec, max_rank)
    read_tensors(folder, manifest, [k for m in binding.modules for k in (m.a_key, m.b_key)])
    return summarize(folder, manifest, binding)
