"""What the store needs to know of the served base model: its LoRA-targetable modules and shapes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class BaseModelSpec:
    """The base model as adapters see it, identified by architecture and shapes, not by name."""

    architecture: str
    modules: dict[str, tuple[int, int]]  # module name -> (d_in, d_out) for every targetable linear
    other_modules: frozenset[str]  # module names that exist but cannot carry LoRA here (embeddings, lm_head)

    @property
    def fingerprint(self) -> str:
        body = json.dumps([self.architecture, sorted(self.modules.items())], separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()[:16]
